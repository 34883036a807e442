/*
 * Protego kernel-protego plugin: connection to the local GMN agent.
 *
 * One unix stream connection carries all requests; a dedicated thread
 * connects, says hello, lets the owner send its state dump, then reads
 * replies (matched to waiting callers by request id) and events until the
 * connection breaks, and starts over. Requests made while the agent is away
 * fail at once; they are never queued (see PROTOCOL.md).
 */

#include "kernel_protego_conn.h"

#include <errno.h>
#include <poll.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <daemon.h>
#include <threading/thread.h>
#include <threading/mutex.h>
#include <threading/condvar.h>
#include <collections/linked_list.h>

/** log a connection problem once per streak (level 1), then at level 2 */
#define DBG_PROBLEM(this, fmt, ...) \
	charon->bus->log(charon->bus, DBG_KNL, (this)->problem_level, fmt, \
					 ##__VA_ARGS__)

typedef struct private_kernel_protego_conn_t private_kernel_protego_conn_t;

struct private_kernel_protego_conn_t {

	/** public interface */
	kernel_protego_conn_t public;

	/** agent socket path */
	char *path;

	/** reply timeout */
	u_int timeout_ms;

	/** reconnect interval */
	u_int retry_ms;

	/** callbacks */
	kp_connected_cb_t connected;
	kp_event_cb_t event;
	void *data;

	/** connected socket, -1 if none; changed under both mutexes */
	int fd;

	/** TRUE once the dump was sent; requests are accepted */
	bool ready;

	/** protects ready, pending, next_id */
	mutex_t *mutex;

	/** signals completed requests */
	condvar_t *cond;

	/** serialises frame writes and guards fd against close */
	mutex_t *write_mutex;

	/** pending_t, requests waiting for replies */
	linked_list_t *pending;

	/** next request id (never 0) */
	uint32_t next_id;

	/** connection thread */
	thread_t *thread;

	/** log level for connection problems: 1 first time, 2 while they repeat */
	level_t problem_level;
};

typedef struct {
	uint32_t id;
	kp_msg_t *reply;
	bool done;
} pending_t;

/**
 * Write a whole buffer to the socket
 */
static bool write_all(int fd, chunk_t data)
{
	ssize_t len;

	while (data.len)
	{
		len = send(fd, data.ptr, data.len, MSG_NOSIGNAL);
		if (len < 0)
		{
			if (errno == EINTR)
			{
				continue;
			}
			return FALSE;
		}
		data = chunk_skip(data, len);
	}
	return TRUE;
}

/**
 * Encode and write a message under the write lock, destroys msg
 */
static bool write_msg(private_kernel_protego_conn_t *this, kp_msg_t *msg)
{
	chunk_t frame;
	bool ok = FALSE;

	frame = kp_msg_encode(msg);
	this->write_mutex->lock(this->write_mutex);
	if (this->fd >= 0)
	{
		ok = write_all(this->fd, frame);
	}
	this->write_mutex->unlock(this->write_mutex);
	if (msg->secret)
	{
		chunk_clear(&frame);
	}
	else
	{
		chunk_free(&frame);
	}
	kp_msg_destroy(msg);
	return ok;
}

/**
 * Read exactly len bytes (a cancellation point), FALSE on EOF/error
 */
static bool read_all(int fd, u_char *buf, size_t len)
{
	ssize_t n;
	bool old;

	while (len)
	{
		old = thread_cancelability(TRUE);
		n = recv(fd, buf, len, 0);
		thread_cancelability(old);
		if (n < 0 && errno == EINTR)
		{
			continue;
		}
		if (n <= 0)
		{
			return FALSE;
		}
		buf += n;
		len -= n;
	}
	return TRUE;
}

/**
 * Read one frame, NULL on EOF, error or malformed frame
 */
static kp_msg_t *read_msg(int fd)
{
	u_char lenbuf[4];
	uint32_t len;
	chunk_t body;
	kp_msg_t *msg;

	if (!read_all(fd, lenbuf, sizeof(lenbuf)))
	{
		return NULL;
	}
	len = untoh32(lenbuf);
	if (len < KP_HEADER_LEN || len > KP_MAX_FRAME)
	{
		DBG1(DBG_KNL, "kernel-protego: agent sent a frame of invalid "
			 "length %u", len);
		return NULL;
	}
	body = chunk_alloc(len);
	if (!read_all(fd, body.ptr, len))
	{
		chunk_free(&body);
		return NULL;
	}
	msg = kp_msg_parse(body);
	chunk_free(&body);
	if (!msg)
	{
		DBG1(DBG_KNL, "kernel-protego: agent sent a malformed frame");
	}
	return msg;
}

/**
 * Wait until fd is readable, FALSE on timeout (a cancellation point)
 */
static bool wait_readable(int fd, u_int timeout_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	bool old;
	int n;

	old = thread_cancelability(TRUE);
	n = poll(&pfd, 1, timeout_ms);
	thread_cancelability(old);
	return n > 0;
}

/**
 * Connect the unix socket, -1 on failure
 */
static int connect_agent(private_kernel_protego_conn_t *this)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fd;
	bool old;

	strncpy(addr.sun_path, this->path, sizeof(addr.sun_path) - 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
	{
		return -1;
	}
	old = thread_cancelability(TRUE);
	if (connect(fd, (struct sockaddr*)&addr, sizeof(addr)) < 0)
	{
		thread_cancelability(old);
		close(fd);
		return -1;
	}
	thread_cancelability(old);
	return fd;
}

/**
 * Say hello and check the agent's protocol version
 */
static bool handshake(private_kernel_protego_conn_t *this, int fd)
{
	kp_msg_t *msg, *reply;
	chunk_t frame, version;
	uint8_t status = KP_STATUS_FAILED;
	bool ok;

	msg = kp_msg_create(KP_HELLO);
	msg->id = 1;
	kp_msg_add_u32(msg, KP_ATTR_VERSION,
				   (KP_VERSION_MAJOR << 16) | KP_VERSION_MINOR);
	kp_msg_add_string(msg, KP_ATTR_SOFTWARE,
					  "strongSwan " VERSION " kernel-protego");
	kp_msg_add_u32(msg, KP_ATTR_PID, getpid());
	frame = kp_msg_encode(msg);
	kp_msg_destroy(msg);
	ok = write_all(fd, frame);
	chunk_free(&frame);
	if (!ok || !wait_readable(fd, this->timeout_ms))
	{
		DBG_PROBLEM(this, "kernel-protego: agent at %s did not answer hello",
			 this->path);
		return FALSE;
	}
	reply = read_msg(fd);
	if (!reply)
	{
		return FALSE;
	}
	ok = FALSE;
	if (reply->type == (KP_REPLY | KP_HELLO) && reply->id == 1 &&
		kp_msg_get_u8(reply, KP_ATTR_STATUS, &status) &&
		kp_msg_get(reply, KP_ATTR_VERSION, &version) && version.len == 4)
	{
		if (untoh16(version.ptr) != KP_VERSION_MAJOR)
		{
			DBG_PROBLEM(this, "kernel-protego: agent speaks protocol %u.%u, "
				 "this plugin speaks %u.%u", untoh16(version.ptr),
				 untoh16(version.ptr + 2), KP_VERSION_MAJOR,
				 KP_VERSION_MINOR);
		}
		else if (status != KP_STATUS_OK)
		{
			DBG_PROBLEM(this, "kernel-protego: agent refused hello (status %u)",
				 status);
		}
		else
		{
			ok = TRUE;
		}
	}
	else
	{
		DBG_PROBLEM(this, "kernel-protego: unexpected hello reply from agent");
	}
	kp_msg_destroy(reply);
	return ok;
}

/**
 * Fail all pending requests and forget the connection
 */
static void disconnect(private_kernel_protego_conn_t *this)
{
	enumerator_t *enumerator;
	pending_t *pending;

	this->mutex->lock(this->mutex);
	this->ready = FALSE;
	enumerator = this->pending->create_enumerator(this->pending);
	while (enumerator->enumerate(enumerator, &pending))
	{
		pending->done = TRUE;
	}
	enumerator->destroy(enumerator);
	this->cond->broadcast(this->cond);
	this->mutex->unlock(this->mutex);

	this->write_mutex->lock(this->write_mutex);
	if (this->fd >= 0)
	{
		close(this->fd);
		this->fd = -1;
	}
	this->write_mutex->unlock(this->write_mutex);
}

/**
 * Hand a reply to the waiting request
 */
static void dispatch_reply(private_kernel_protego_conn_t *this, kp_msg_t *msg)
{
	enumerator_t *enumerator;
	pending_t *pending;
	bool found = FALSE;

	this->mutex->lock(this->mutex);
	enumerator = this->pending->create_enumerator(this->pending);
	while (enumerator->enumerate(enumerator, &pending))
	{
		if (pending->id == msg->id && !pending->done)
		{
			pending->reply = msg;
			pending->done = TRUE;
			found = TRUE;
			break;
		}
	}
	enumerator->destroy(enumerator);
	if (found)
	{
		this->cond->broadcast(this->cond);
	}
	this->mutex->unlock(this->mutex);
	if (!found)
	{	/* the request timed out */
		kp_msg_destroy(msg);
	}
}

/**
 * Sleep the reconnect interval (a cancellation point)
 */
static void pause_retry(private_kernel_protego_conn_t *this)
{
	bool old;

	old = thread_cancelability(TRUE);
	usleep(this->retry_ms * 1000);
	thread_cancelability(old);
}

/**
 * Connection thread
 */
static void *run(private_kernel_protego_conn_t *this)
{
	kp_msg_t *msg;
	bool unreachable_logged = FALSE;
	int fd;

	thread_cancelability(FALSE);
	while (TRUE)
	{
		fd = connect_agent(this);
		if (fd < 0)
		{
			if (!unreachable_logged)
			{
				DBG1(DBG_KNL, "kernel-protego: agent not reachable at %s, "
					 "retrying every %u ms", this->path, this->retry_ms);
				unreachable_logged = TRUE;
			}
			pause_retry(this);
			continue;
		}
		if (!handshake(this, fd))
		{
			this->problem_level = LEVEL_DIAG;
			close(fd);
			pause_retry(this);
			continue;
		}
		this->problem_level = LEVEL_CTRL;
		unreachable_logged = FALSE;
		this->mutex->lock(this->mutex);
		this->write_mutex->lock(this->write_mutex);
		this->fd = fd;
		this->write_mutex->unlock(this->write_mutex);
		this->mutex->unlock(this->mutex);

		DBG1(DBG_KNL, "kernel-protego: connected to agent at %s (protocol "
			 "%u.%u)", this->path, KP_VERSION_MAJOR, KP_VERSION_MINOR);
		this->connected(this->data, &this->public);

		while ((msg = read_msg(fd)))
		{
			if (msg->type & KP_REPLY)
			{
				dispatch_reply(this, msg);
			}
			else
			{
				if (msg->id == 0)
				{
					this->event(this->data, msg);
				}
				kp_msg_destroy(msg);
			}
		}
		DBG1(DBG_KNL, "kernel-protego: connection to agent at %s lost",
			 this->path);
		disconnect(this);
		pause_retry(this);
	}
	return NULL;
}

METHOD(kernel_protego_conn_t, request, kp_msg_t*,
	private_kernel_protego_conn_t *this, kp_msg_t *msg)
{
	pending_t pending = {};
	timeval_t deadline;
	kp_msg_t *reply;

	this->mutex->lock(this->mutex);
	if (!this->ready)
	{
		this->mutex->unlock(this->mutex);
		kp_msg_destroy(msg);
		return NULL;
	}
	if (++this->next_id == 0)
	{
		this->next_id = 2;
	}
	pending.id = msg->id = this->next_id;
	this->pending->insert_last(this->pending, &pending);
	this->mutex->unlock(this->mutex);

	if (!write_msg(this, msg))
	{
		this->mutex->lock(this->mutex);
		this->pending->remove(this->pending, &pending, NULL);
		this->mutex->unlock(this->mutex);
		return NULL;
	}

	time_monotonic(&deadline);
	timeval_add_ms(&deadline, this->timeout_ms);
	this->mutex->lock(this->mutex);
	while (!pending.done)
	{
		if (this->cond->timed_wait_abs(this->cond, this->mutex, deadline))
		{
			break;
		}
	}
	this->pending->remove(this->pending, &pending, NULL);
	reply = pending.reply;
	this->mutex->unlock(this->mutex);
	if (!reply && !pending.done)
	{
		DBG1(DBG_KNL, "kernel-protego: no reply from agent within %u ms",
			 this->timeout_ms);
	}
	return reply;
}

METHOD(kernel_protego_conn_t, send_unlocked, bool,
	private_kernel_protego_conn_t *this, kp_msg_t *msg)
{
	msg->id = 0;
	return write_msg(this, msg);
}

METHOD(kernel_protego_conn_t, set_ready, void,
	private_kernel_protego_conn_t *this)
{
	this->mutex->lock(this->mutex);
	this->ready = this->fd >= 0;
	this->mutex->unlock(this->mutex);
}

METHOD(kernel_protego_conn_t, is_ready, bool,
	private_kernel_protego_conn_t *this)
{
	bool ready;

	this->mutex->lock(this->mutex);
	ready = this->ready;
	this->mutex->unlock(this->mutex);
	return ready;
}

METHOD(kernel_protego_conn_t, destroy, void,
	private_kernel_protego_conn_t *this)
{
	this->thread->cancel(this->thread);
	this->thread->join(this->thread);
	disconnect(this);
	this->pending->destroy(this->pending);
	this->cond->destroy(this->cond);
	this->mutex->destroy(this->mutex);
	this->write_mutex->destroy(this->write_mutex);
	free(this->path);
	free(this);
}

/*
 * See header
 */
kernel_protego_conn_t *kernel_protego_conn_create(char *path, u_int timeout_ms,
							u_int retry_ms, kp_connected_cb_t connected,
							kp_event_cb_t event, void *data)
{
	private_kernel_protego_conn_t *this;

	INIT(this,
		.public = {
			.request = _request,
			.send_unlocked = _send_unlocked,
			.set_ready = _set_ready,
			.is_ready = _is_ready,
			.destroy = _destroy,
		},
		.path = strdup(path),
		.timeout_ms = timeout_ms,
		.retry_ms = retry_ms,
		.connected = connected,
		.event = event,
		.data = data,
		.fd = -1,
		.problem_level = LEVEL_CTRL,
		.mutex = mutex_create(MUTEX_TYPE_DEFAULT),
		.cond = condvar_create(CONDVAR_TYPE_DEFAULT),
		.write_mutex = mutex_create(MUTEX_TYPE_DEFAULT),
		.pending = linked_list_create(),
		.next_id = 1,
	);

	this->thread = thread_create((thread_main_t)run, this);
	if (!this->thread)
	{
		this->pending->destroy(this->pending);
		this->cond->destroy(this->cond);
		this->mutex->destroy(this->mutex);
		this->write_mutex->destroy(this->write_mutex);
		free(this->path);
		free(this);
		return NULL;
	}
	return &this->public;
}
