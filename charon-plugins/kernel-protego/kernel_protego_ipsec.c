/*
 * Protego kernel-protego plugin: charon's kernel_ipsec_t backed by the
 * local Protego GMN agent.
 *
 * Every call is forwarded to the agent (see PROTOCOL.md). The plugin keeps
 * what a kernel would keep so it can replay it to a restarted agent (a state
 * dump on every reconnect) and so it can raise the soft/hard lifetime
 * expires no kernel raises here. Keys are held in memory only, sent only over
 * the agent socket and wiped when an SA goes; logs show SPIs and reqids only.
 */

#include "kernel_protego_ipsec.h"
#include "kernel_protego_conn.h"
#include "kernel_protego_msg.h"

#include <sys/un.h>

#include <daemon.h>
#include <threading/mutex.h>
#include <threading/rwlock.h>
#include <collections/linked_list.h>
#include <processing/jobs/callback_job.h>
#include <bio/bio_reader.h>
#include <bio/bio_writer.h>

#define DEFAULT_SOCKET "/run/protego/gmn-plugin.sock"
#define DEFAULT_TIMEOUT_MS 5000
#define DEFAULT_RETRY_MS 500

typedef struct private_kernel_protego_ipsec_t private_kernel_protego_ipsec_t;

struct private_kernel_protego_ipsec_t {

	/** public interface */
	kernel_protego_ipsec_t public;

	/** connection to the agent */
	kernel_protego_conn_t *conn;

	/** protects sas, policies and next_uid (never held across a request:
	 * a request may wait for the agent for tens of ms, e.g. an outbound SA
	 * of a rekey until the data path has the inbound one, and other CHILD_SAs
	 * must not wait behind it) */
	mutex_t *mutex;

	/** held for reading by every state-changing call across its request,
	 * for writing by the state dump on reconnect: the dump never races a
	 * change, and changes run in parallel */
	rwlock_t *changes;

	/** serializes the policy calls (reference counts of shared policies
	 * follow the agent's answers in order); policies only */
	mutex_t *policy_mutex;

	/** sa_entry_t, installed SAs */
	linked_list_t *sas;

	/** policy_entry_t, installed policies */
	linked_list_t *policies;

	/** unique id for SA entries (timers refer to entries by it) */
	uint64_t next_uid;
};

/**
 * An installed SA
 */
typedef struct {
	/** unique id, for timers */
	uint64_t uid;
	/** identity: src, dst, spi (network order), protocol, mark, if_id */
	host_t *src;
	host_t *dst;
	uint32_t spi;
	uint8_t proto;
	mark_t mark;
	uint32_t if_id;
	/** reqid, for logging */
	uint32_t reqid;
	/** inbound SA */
	bool inbound;
	/** the ADD_SA attributes as last sent (holds keys; wiped on free) */
	chunk_t attrs;
	/** monotonic install time */
	time_t installed;
	/** hard expire raised */
	bool hard_expired;
} sa_entry_t;

/**
 * An installed policy (reference counted, as charon installs the same
 * policy once per CHILD_SA while rekeying)
 */
typedef struct {
	/** encoded policy identity (direction, selectors, mark, ...) */
	chunk_t id;
	/** the ADD_POLICY attributes as last sent */
	chunk_t attrs;
	/** references */
	u_int refs;
} policy_entry_t;

static void sa_entry_destroy(sa_entry_t *entry)
{
	entry->src->destroy(entry->src);
	entry->dst->destroy(entry->dst);
	chunk_clear(&entry->attrs);
	free(entry);
}

static void policy_entry_destroy(policy_entry_t *entry)
{
	chunk_free(&entry->id);
	chunk_free(&entry->attrs);
	free(entry);
}

/**
 * Map a reply's status to charon's status_t, NULL reply means no agent
 */
static status_t reply_status(kp_msg_t *reply)
{
	uint8_t status;

	if (!reply || !kp_msg_get_u8(reply, KP_ATTR_STATUS, &status))
	{
		return FAILED;
	}
	switch (status)
	{
		case KP_STATUS_OK:
			return SUCCESS;
		case KP_STATUS_NOT_FOUND:
			return NOT_FOUND;
		case KP_STATUS_NOT_SUPPORTED:
			return NOT_SUPPORTED;
		default:
			return FAILED;
	}
}

/**
 * Send a request and return the mapped status (reply destroyed unless
 * out is given)
 */
static status_t do_request(private_kernel_protego_ipsec_t *this,
						   kp_msg_t *msg, kp_msg_t **out)
{
	kp_msg_t *reply;
	status_t status;

	reply = this->conn->request(this->conn, msg);
	status = reply_status(reply);
	if (out && status == SUCCESS)
	{
		*out = reply;
	}
	else
	{
		kp_msg_destroy(reply);
	}
	return status;
}

/**
 * Add the attributes identifying an SA
 */
static void add_sa_id(kp_msg_t *msg, kernel_ipsec_sa_id_t *id)
{
	kp_msg_add_host(msg, KP_ATTR_SRC, id->src);
	kp_msg_add_host(msg, KP_ATTR_DST, id->dst);
	kp_msg_add_u32(msg, KP_ATTR_SPI, ntohl(id->spi));
	kp_msg_add_u8(msg, KP_ATTR_PROTO, id->proto);
	if (id->mark.value || id->mark.mask)
	{
		kp_msg_add_mark(msg, KP_ATTR_MARK, id->mark.value, id->mark.mask);
	}
	if (id->if_id)
	{
		kp_msg_add_u32(msg, KP_ATTR_IF_ID, id->if_id);
	}
}

/**
 * Find an SA entry by its identity, mutex held
 */
static sa_entry_t *find_sa(private_kernel_protego_ipsec_t *this,
						   uint32_t spi, uint8_t proto, host_t *dst,
						   mark_t mark, bool remove)
{
	enumerator_t *enumerator;
	sa_entry_t *entry, *found = NULL;

	enumerator = this->sas->create_enumerator(this->sas);
	while (enumerator->enumerate(enumerator, &entry))
	{
		if (entry->spi == spi && entry->proto == proto &&
			entry->mark.value == mark.value &&
			entry->dst->ip_equals(entry->dst, dst))
		{
			found = entry;
			if (remove)
			{
				this->sas->remove_at(this->sas, enumerator);
			}
			break;
		}
	}
	enumerator->destroy(enumerator);
	return found;
}

/**
 * Raise an expire for an SA entry identified by uid (from a job)
 */
static void raise_expire(private_kernel_protego_ipsec_t *this, uint64_t uid,
						 bool hard, const char *source)
{
	enumerator_t *enumerator;
	sa_entry_t *entry;
	host_t *dst = NULL;
	uint32_t spi = 0, reqid = 0;
	uint8_t proto = 0;

	this->mutex->lock(this->mutex);
	enumerator = this->sas->create_enumerator(this->sas);
	while (enumerator->enumerate(enumerator, &entry))
	{
		if (entry->uid == uid)
		{
			if (!entry->hard_expired)
			{
				dst = entry->dst->clone(entry->dst);
				spi = entry->spi;
				proto = entry->proto;
				reqid = entry->reqid;
				entry->hard_expired = hard;
			}
			break;
		}
	}
	enumerator->destroy(enumerator);
	this->mutex->unlock(this->mutex);

	if (dst)
	{
		DBG1(DBG_KNL, "kernel-protego: %s %s expire of SA %.8x (reqid %u)",
			 source, hard ? "hard" : "soft", ntohl(spi), reqid);
		charon->kernel->expire(charon->kernel, proto, spi, dst, hard);
		dst->destroy(dst);
	}
}

typedef struct {
	private_kernel_protego_ipsec_t *this;
	uint64_t uid;
	bool hard;
	/* for agent events, resolved on the processor thread */
	uint32_t spi;
	uint8_t proto;
	host_t *dst;
} expire_job_t;

static void expire_job_destroy(expire_job_t *job)
{
	DESTROY_IF(job->dst);
	free(job);
}

static job_requeue_t expire_timer_cb(expire_job_t *job)
{
	raise_expire(job->this, job->uid, job->hard, "lifetime");
	return JOB_REQUEUE_NONE;
}

static job_requeue_t expire_event_cb(expire_job_t *job)
{
	private_kernel_protego_ipsec_t *this = job->this;
	enumerator_t *enumerator;
	sa_entry_t *entry;
	uint64_t uid = 0;

	/* agent events carry no mark: match on spi, protocol and destination */
	this->mutex->lock(this->mutex);
	enumerator = this->sas->create_enumerator(this->sas);
	while (enumerator->enumerate(enumerator, &entry))
	{
		if (entry->spi == job->spi && entry->proto == job->proto &&
			entry->dst->ip_equals(entry->dst, job->dst))
		{
			uid = entry->uid;
			break;
		}
	}
	enumerator->destroy(enumerator);
	this->mutex->unlock(this->mutex);

	if (uid)
	{
		raise_expire(this, uid, job->hard, "agent");
	}
	else
	{
		DBG1(DBG_KNL, "kernel-protego: agent expire for unknown SA %.8x",
			 ntohl(job->spi));
	}
	return JOB_REQUEUE_NONE;
}

/**
 * Schedule the soft and hard expire timers of a new SA
 */
static void schedule_expires(private_kernel_protego_ipsec_t *this,
							 uint64_t uid, lifetime_cfg_t *lifetime)
{
	expire_job_t *job;

	if (!lifetime)
	{
		return;
	}
	if (lifetime->time.rekey)
	{
		INIT(job, .this = this, .uid = uid, .hard = FALSE);
		lib->scheduler->schedule_job(lib->scheduler,
			(job_t*)callback_job_create((callback_job_cb_t)expire_timer_cb,
					job, (callback_job_cleanup_t)expire_job_destroy, NULL),
			lifetime->time.rekey);
	}
	if (lifetime->time.life)
	{
		INIT(job, .this = this, .uid = uid, .hard = TRUE);
		lib->scheduler->schedule_job(lib->scheduler,
			(job_t*)callback_job_create((callback_job_cb_t)expire_timer_cb,
					job, (callback_job_cleanup_t)expire_job_destroy, NULL),
			lifetime->time.life);
	}
}

METHOD(kernel_ipsec_t, get_features, kernel_feature_t,
	private_kernel_protego_ipsec_t *this)
{
	/* what Linux XFRM offers, which the GPNs' data paths implement */
	return KERNEL_ESP_V3_TFC | KERNEL_POLICY_SPI;
}

METHOD(kernel_ipsec_t, get_spi, status_t,
	private_kernel_protego_ipsec_t *this, host_t *src, host_t *dst,
	uint8_t protocol, uint32_t *spi)
{
	kp_msg_t *msg, *reply = NULL;
	uint32_t value;
	status_t status;

	msg = kp_msg_create(KP_GET_SPI);
	kp_msg_add_host(msg, KP_ATTR_SRC, src);
	kp_msg_add_host(msg, KP_ATTR_DST, dst);
	kp_msg_add_u8(msg, KP_ATTR_PROTO, protocol);
	status = do_request(this, msg, &reply);
	if (status == SUCCESS)
	{
		if (kp_msg_get_u32(reply, KP_ATTR_SPI, &value) && value >= 256)
		{
			*spi = htonl(value);
			DBG2(DBG_KNL, "kernel-protego: agent allocated SPI %.8x", value);
		}
		else
		{
			status = FAILED;
		}
		kp_msg_destroy(reply);
	}
	if (status != SUCCESS)
	{
		DBG1(DBG_KNL, "kernel-protego: unable to get SPI from agent");
	}
	return status;
}

METHOD(kernel_ipsec_t, get_cpi, status_t,
	private_kernel_protego_ipsec_t *this, host_t *src, host_t *dst,
	uint16_t *cpi)
{
	kp_msg_t *msg, *reply = NULL;
	uint16_t value;
	status_t status;

	msg = kp_msg_create(KP_GET_CPI);
	kp_msg_add_host(msg, KP_ATTR_SRC, src);
	kp_msg_add_host(msg, KP_ATTR_DST, dst);
	status = do_request(this, msg, &reply);
	if (status == SUCCESS)
	{
		if (kp_msg_get_u16(reply, KP_ATTR_CPI, &value))
		{
			*cpi = htons(value);
		}
		else
		{
			status = FAILED;
		}
		kp_msg_destroy(reply);
	}
	return status;
}

/**
 * Copy a message's attributes for the SA/policy tables
 */
static chunk_t msg_attrs(kp_msg_t *msg)
{
	return chunk_clone(msg->writer->get_buf(msg->writer));
}

METHOD(kernel_ipsec_t, add_sa, status_t,
	private_kernel_protego_ipsec_t *this, kernel_ipsec_sa_id_t *id,
	kernel_ipsec_add_sa_t *data)
{
	enumerator_t *enumerator;
	traffic_selector_t *ts;
	lifetime_cfg_t *lt = data->lifetime;
	sa_entry_t *entry;
	kp_msg_t *msg;
	status_t status;
	uint32_t flags = 0;

	msg = kp_msg_create(KP_ADD_SA);
	add_sa_id(msg, id);
	kp_msg_add_u32(msg, KP_ATTR_REQID, data->reqid);
	kp_msg_add_u8(msg, KP_ATTR_MODE, data->mode);
	if (data->src_ts)
	{
		enumerator = data->src_ts->create_enumerator(data->src_ts);
		while (enumerator->enumerate(enumerator, &ts))
		{
			kp_msg_add_ts(msg, KP_ATTR_SRC_TS, ts);
		}
		enumerator->destroy(enumerator);
	}
	if (data->dst_ts)
	{
		enumerator = data->dst_ts->create_enumerator(data->dst_ts);
		while (enumerator->enumerate(enumerator, &ts))
		{
			kp_msg_add_ts(msg, KP_ATTR_DST_TS, ts);
		}
		enumerator->destroy(enumerator);
	}
	if (data->interface)
	{
		kp_msg_add_string(msg, KP_ATTR_INTERFACE, data->interface);
	}
	kp_msg_add_u16(msg, KP_ATTR_ENC_ALG, data->enc_alg);
	kp_msg_add_u16(msg, KP_ATTR_INT_ALG, data->int_alg);
	kp_msg_add_u32(msg, KP_ATTR_REPLAY_WINDOW, data->replay_window);
	kp_msg_add_u32(msg, KP_ATTR_TFC, data->tfc);
	if (data->ipcomp)
	{
		kp_msg_add_u16(msg, KP_ATTR_IPCOMP, data->ipcomp);
		kp_msg_add_u16(msg, KP_ATTR_CPI, ntohs(data->cpi));
	}
	kp_msg_add_u8(msg, KP_ATTR_HW_OFFLOAD, data->hw_offload);
	kp_msg_add_u8(msg, KP_ATTR_COPY_DSCP, data->copy_dscp);
	if (data->mark.value || data->mark.mask)
	{
		kp_msg_add_mark(msg, KP_ATTR_SET_MARK, data->mark.value,
						data->mark.mask);
	}
	if (data->label)
	{
		kp_msg_add_data(msg, KP_ATTR_LABEL,
						data->label->get_encoding(data->label));
	}
	flags |= data->encap ? KP_SA_ENCAP : 0;
	flags |= data->esn ? KP_SA_ESN : 0;
	flags |= data->copy_df ? KP_SA_COPY_DF : 0;
	flags |= data->copy_ecn ? KP_SA_COPY_ECN : 0;
	flags |= data->initiator ? KP_SA_INITIATOR : 0;
	flags |= data->inbound ? KP_SA_INBOUND : 0;
	flags |= data->update ? KP_SA_UPDATE : 0;
	kp_msg_add_u32(msg, KP_ATTR_SA_FLAGS, flags);
	if (lt)
	{
		bio_writer_t *w = bio_writer_create(72);

		w->write_uint64(w, lt->time.life);
		w->write_uint64(w, lt->time.rekey);
		w->write_uint64(w, lt->time.jitter);
		w->write_uint64(w, lt->bytes.life);
		w->write_uint64(w, lt->bytes.rekey);
		w->write_uint64(w, lt->bytes.jitter);
		w->write_uint64(w, lt->packets.life);
		w->write_uint64(w, lt->packets.rekey);
		w->write_uint64(w, lt->packets.jitter);
		kp_msg_add_data(msg, KP_ATTR_LIFETIME, w->get_buf(w));
		w->destroy(w);
	}

	/* keys last, into the preallocated buffer (see kernel_protego_msg.c) */
	kp_msg_add_secret(msg, KP_ATTR_ENC_KEY, data->enc_key);
	kp_msg_add_secret(msg, KP_ATTR_INT_KEY, data->int_key);

	INIT(entry,
		.src = id->src->clone(id->src),
		.dst = id->dst->clone(id->dst),
		.spi = id->spi,
		.proto = id->proto,
		.mark = id->mark,
		.if_id = id->if_id,
		.reqid = data->reqid,
		.inbound = data->inbound,
		.attrs = msg_attrs(msg),
		.installed = time_monotonic(NULL),
	);

	this->changes->read_lock(this->changes);
	status = do_request(this, msg, NULL);
	if (status == SUCCESS)
	{
		this->mutex->lock(this->mutex);
		entry->uid = ++this->next_uid;
		this->sas->insert_last(this->sas, entry);
		schedule_expires(this, entry->uid, lt);
		this->mutex->unlock(this->mutex);
	}
	this->changes->unlock(this->changes);

	if (status == SUCCESS)
	{
		DBG2(DBG_KNL, "kernel-protego: added %s SA %.8x (reqid %u)",
			 data->inbound ? "inbound" : "outbound", ntohl(id->spi),
			 data->reqid);
	}
	else
	{
		DBG1(DBG_KNL, "kernel-protego: unable to add SA %.8x (reqid %u): "
			 "agent %s", ntohl(id->spi), data->reqid,
			 this->conn->is_ready(this->conn) ? "refused" : "not connected");
		sa_entry_destroy(entry);
	}
	return status;
}

/**
 * Rewrite stored ADD_SA attributes after update_sa (drop replaced types,
 * append the new values)
 */
static chunk_t rewrite_attrs(chunk_t old, kp_msg_t *update)
{
	bio_reader_t *reader;
	bio_writer_t *writer;
	uint16_t type;
	chunk_t value, result;

	writer = bio_writer_create(old.len + 64);
	reader = bio_reader_create(old);
	while (reader->read_uint16(reader, &type) &&
		   reader->read_data16(reader, &value))
	{
		if (type == KP_ATTR_SRC || type == KP_ATTR_DST ||
			type == KP_ATTR_SA_FLAGS || type == KP_ATTR_REQID)
		{
			continue;
		}
		writer->write_uint16(writer, type);
		writer->write_data16(writer, value);
	}
	reader->destroy(reader);
	writer->write_data(writer, update->writer->get_buf(update->writer));
	result = writer->extract_buf(writer);
	writer->destroy(writer);
	return result;
}

METHOD(kernel_ipsec_t, update_sa, status_t,
	private_kernel_protego_ipsec_t *this, kernel_ipsec_sa_id_t *id,
	kernel_ipsec_update_sa_t *data)
{
	sa_entry_t *entry;
	kp_msg_t *msg, *stored;
	status_t status;
	uint32_t flags = 0;

	msg = kp_msg_create(KP_UPDATE_SA);
	add_sa_id(msg, id);
	kp_msg_add_host(msg, KP_ATTR_NEW_SRC, data->new_src);
	kp_msg_add_host(msg, KP_ATTR_NEW_DST, data->new_dst);
	if (data->new_reqid)
	{
		kp_msg_add_u32(msg, KP_ATTR_NEW_REQID, data->new_reqid);
	}
	if (data->cpi)
	{
		kp_msg_add_u16(msg, KP_ATTR_CPI, ntohs(data->cpi));
	}
	flags |= data->encap ? KP_SA_ENCAP : 0;
	flags |= data->new_encap ? KP_SA_NEW_ENCAP : 0;
	kp_msg_add_u32(msg, KP_ATTR_SA_FLAGS, flags);

	this->changes->read_lock(this->changes);
	status = do_request(this, msg, NULL);
	this->mutex->lock(this->mutex);
	entry = find_sa(this, id->spi, id->proto, id->dst, id->mark, FALSE);
	if (status == SUCCESS && entry)
	{
		uint32_t sa_flags = 0;
		chunk_t value;

		/* keep the dump's copy current: new hosts, flags, reqid */
		if (kp_msg_get(&(kp_msg_t){ .attrs = entry->attrs },
					   KP_ATTR_SA_FLAGS, &value) && value.len == 4)
		{
			sa_flags = untoh32(value.ptr);
		}
		sa_flags = (sa_flags & ~KP_SA_ENCAP) |
				   (data->new_encap ? KP_SA_ENCAP : 0);
		stored = kp_msg_create(KP_ADD_SA);
		kp_msg_add_host(stored, KP_ATTR_SRC, data->new_src);
		kp_msg_add_host(stored, KP_ATTR_DST, data->new_dst);
		kp_msg_add_u32(stored, KP_ATTR_SA_FLAGS, sa_flags);
		if (data->new_reqid)
		{
			entry->reqid = data->new_reqid;
		}
		kp_msg_add_u32(stored, KP_ATTR_REQID, entry->reqid);
		value = rewrite_attrs(entry->attrs, stored);
		kp_msg_destroy(stored);
		chunk_clear(&entry->attrs);
		entry->attrs = value;
		entry->src->destroy(entry->src);
		entry->dst->destroy(entry->dst);
		entry->src = data->new_src->clone(data->new_src);
		entry->dst = data->new_dst->clone(data->new_dst);
	}
	this->mutex->unlock(this->mutex);
	this->changes->unlock(this->changes);

	DBG2(DBG_KNL, "kernel-protego: update of SA %.8x: %N", ntohl(id->spi),
		 status_names, status);
	return status;
}

METHOD(kernel_ipsec_t, query_sa, status_t,
	private_kernel_protego_ipsec_t *this, kernel_ipsec_sa_id_t *id,
	kernel_ipsec_query_sa_t *data, uint64_t *bytes, uint64_t *packets,
	time_t *time)
{
	kp_msg_t *msg, *reply = NULL;
	uint64_t value;
	uint32_t idle;
	status_t status;

	msg = kp_msg_create(KP_QUERY_SA);
	add_sa_id(msg, id);
	status = do_request(this, msg, &reply);
	if (status != SUCCESS)
	{
		return status;
	}
	if (bytes)
	{
		*bytes = kp_msg_get_u64(reply, KP_ATTR_BYTES, &value) ? value : 0;
	}
	if (packets)
	{
		*packets = kp_msg_get_u64(reply, KP_ATTR_PACKETS, &value) ? value : 0;
	}
	if (time)
	{
		*time = 0;
		if (kp_msg_get_u32(reply, KP_ATTR_IDLE, &idle))
		{
			*time = time_monotonic(NULL) - idle;
		}
	}
	kp_msg_destroy(reply);
	return SUCCESS;
}

METHOD(kernel_ipsec_t, del_sa, status_t,
	private_kernel_protego_ipsec_t *this, kernel_ipsec_sa_id_t *id,
	kernel_ipsec_del_sa_t *data)
{
	sa_entry_t *entry;
	kp_msg_t *msg;
	status_t status;

	msg = kp_msg_create(KP_DEL_SA);
	add_sa_id(msg, id);
	if (data && data->cpi)
	{
		kp_msg_add_u16(msg, KP_ATTR_CPI, ntohs(data->cpi));
	}
	this->changes->read_lock(this->changes);
	this->mutex->lock(this->mutex);
	entry = find_sa(this, id->spi, id->proto, id->dst, id->mark, TRUE);
	this->mutex->unlock(this->mutex);
	/* a lost agent learns about the deletion from the next state dump */
	status = do_request(this, msg, NULL);
	this->changes->unlock(this->changes);

	DBG2(DBG_KNL, "kernel-protego: deleted SA %.8x (reqid %u)",
		 ntohl(id->spi), entry ? entry->reqid : 0);
	if (entry)
	{
		sa_entry_destroy(entry);
		return SUCCESS;
	}
	return status == SUCCESS ? SUCCESS : NOT_FOUND;
}

METHOD(kernel_ipsec_t, flush_sas, status_t,
	private_kernel_protego_ipsec_t *this)
{
	status_t status;

	this->changes->read_lock(this->changes);
	this->mutex->lock(this->mutex);
	this->sas->destroy_function(this->sas, (void*)sa_entry_destroy);
	this->sas = linked_list_create();
	this->mutex->unlock(this->mutex);
	status = do_request(this, kp_msg_create(KP_FLUSH_SAS), NULL);
	this->changes->unlock(this->changes);
	return this->conn->is_ready(this->conn) ? status : SUCCESS;
}

/**
 * Build the attributes identifying a policy
 */
static void add_policy_id(kp_msg_t *msg, kernel_ipsec_policy_id_t *id)
{
	kp_msg_add_u8(msg, KP_ATTR_POLICY_DIR, id->dir);
	kp_msg_add_ts(msg, KP_ATTR_SRC_TS, id->src_ts);
	kp_msg_add_ts(msg, KP_ATTR_DST_TS, id->dst_ts);
	if (id->mark.value || id->mark.mask)
	{
		kp_msg_add_mark(msg, KP_ATTR_MARK, id->mark.value, id->mark.mask);
	}
	if (id->if_id)
	{
		kp_msg_add_u32(msg, KP_ATTR_IF_ID, id->if_id);
	}
	if (id->interface)
	{
		kp_msg_add_string(msg, KP_ATTR_INTERFACE, id->interface);
	}
	if (id->label)
	{
		kp_msg_add_data(msg, KP_ATTR_LABEL, id->label->get_encoding(id->label));
	}
}

static void add_policy_data(kp_msg_t *msg, kernel_ipsec_manage_policy_t *data)
{
	kp_msg_add_u8(msg, KP_ATTR_POLICY_TYPE, data->type);
	kp_msg_add_u8(msg, KP_ATTR_POLICY_PRIO, data->prio);
	if (data->manual_prio)
	{
		kp_msg_add_u32(msg, KP_ATTR_MANUAL_PRIO, data->manual_prio);
	}
	kp_msg_add_host(msg, KP_ATTR_SRC, data->src);
	kp_msg_add_host(msg, KP_ATTR_DST, data->dst);
	if (data->sa)
	{
		kp_msg_add_u8(msg, KP_ATTR_MODE, data->sa->mode);
		kp_msg_add_u32(msg, KP_ATTR_REQID, data->sa->reqid);
		if (data->sa->esp.use)
		{
			kp_msg_add_u32(msg, KP_ATTR_ESP_SPI, ntohl(data->sa->esp.spi));
		}
		if (data->sa->ah.use)
		{
			kp_msg_add_u32(msg, KP_ATTR_AH_SPI, ntohl(data->sa->ah.spi));
		}
		if (data->sa->ipcomp.transform)
		{
			kp_msg_add_u16(msg, KP_ATTR_IPCOMP, data->sa->ipcomp.transform);
			kp_msg_add_u16(msg, KP_ATTR_CPI, ntohs(data->sa->ipcomp.cpi));
		}
	}
}

/**
 * Find a policy entry by its encoded identity, mutex held
 */
static policy_entry_t *find_policy(private_kernel_protego_ipsec_t *this,
								   chunk_t id)
{
	enumerator_t *enumerator;
	policy_entry_t *entry, *found = NULL;

	enumerator = this->policies->create_enumerator(this->policies);
	while (enumerator->enumerate(enumerator, &entry))
	{
		if (chunk_equals(entry->id, id))
		{
			found = entry;
			break;
		}
	}
	enumerator->destroy(enumerator);
	return found;
}

METHOD(kernel_ipsec_t, add_policy, status_t,
	private_kernel_protego_ipsec_t *this, kernel_ipsec_policy_id_t *id,
	kernel_ipsec_manage_policy_t *data)
{
	policy_entry_t *entry;
	kp_msg_t *msg;
	chunk_t encoded_id;
	status_t status;

	msg = kp_msg_create(KP_ADD_POLICY);
	add_policy_id(msg, id);
	encoded_id = msg_attrs(msg);
	add_policy_data(msg, data);

	this->changes->read_lock(this->changes);
	this->policy_mutex->lock(this->policy_mutex);
	entry = find_policy(this, encoded_id);
	if (!entry)
	{
		INIT(entry,
			.id = encoded_id,
		);
		this->policies->insert_last(this->policies, entry);
	}
	else
	{
		chunk_free(&encoded_id);
	}
	chunk_free(&entry->attrs);
	entry->attrs = msg_attrs(msg);
	/* every add is forwarded, the agent keeps the newest SA config */
	status = do_request(this, msg, NULL);
	if (status == SUCCESS)
	{
		entry->refs++;
	}
	else if (!entry->refs)
	{
		this->policies->remove(this->policies, entry, NULL);
		policy_entry_destroy(entry);
	}
	this->policy_mutex->unlock(this->policy_mutex);
	this->changes->unlock(this->changes);
	return status;
}

METHOD(kernel_ipsec_t, query_policy, status_t,
	private_kernel_protego_ipsec_t *this, kernel_ipsec_policy_id_t *id,
	kernel_ipsec_query_policy_t *data, time_t *use_time)
{
	kp_msg_t *msg, *reply = NULL;
	uint32_t idle;
	status_t status;

	msg = kp_msg_create(KP_QUERY_POLICY);
	add_policy_id(msg, id);
	status = do_request(this, msg, &reply);
	if (status == SUCCESS)
	{
		if (kp_msg_get_u32(reply, KP_ATTR_IDLE, &idle))
		{
			*use_time = time_monotonic(NULL) - idle;
		}
		else
		{
			status = NOT_FOUND;
		}
		kp_msg_destroy(reply);
	}
	return status;
}

METHOD(kernel_ipsec_t, del_policy, status_t,
	private_kernel_protego_ipsec_t *this, kernel_ipsec_policy_id_t *id,
	kernel_ipsec_manage_policy_t *data)
{
	policy_entry_t *entry;
	kp_msg_t *msg;
	chunk_t encoded_id;
	status_t status = SUCCESS;

	msg = kp_msg_create(KP_DEL_POLICY);
	add_policy_id(msg, id);
	encoded_id = msg_attrs(msg);
	add_policy_data(msg, data);

	this->changes->read_lock(this->changes);
	this->policy_mutex->lock(this->policy_mutex);
	entry = find_policy(this, encoded_id);
	chunk_free(&encoded_id);
	if (!entry)
	{
		this->policy_mutex->unlock(this->policy_mutex);
		this->changes->unlock(this->changes);
		kp_msg_destroy(msg);
		return NOT_FOUND;
	}
	if (--entry->refs == 0)
	{
		this->policies->remove(this->policies, entry, NULL);
		policy_entry_destroy(entry);
		/* only the last reference goes to the agent; a lost agent learns
		 * about it from the next state dump */
		do_request(this, msg, NULL);
	}
	else
	{
		kp_msg_destroy(msg);
	}
	this->policy_mutex->unlock(this->policy_mutex);
	this->changes->unlock(this->changes);
	return status;
}

METHOD(kernel_ipsec_t, flush_policies, status_t,
	private_kernel_protego_ipsec_t *this)
{
	status_t status;

	this->changes->read_lock(this->changes);
	this->policy_mutex->lock(this->policy_mutex);
	this->policies->destroy_function(this->policies,
									 (void*)policy_entry_destroy);
	this->policies = linked_list_create();
	status = do_request(this, kp_msg_create(KP_FLUSH_POLICIES), NULL);
	this->policy_mutex->unlock(this->policy_mutex);
	this->changes->unlock(this->changes);
	return this->conn->is_ready(this->conn) ? status : SUCCESS;
}

METHOD(kernel_ipsec_t, bypass_socket, bool,
	private_kernel_protego_ipsec_t *this, int fd, int family)
{
	/* no IPsec policies live in this node's kernel: IKE needs no bypass */
	return TRUE;
}

METHOD(kernel_ipsec_t, enable_udp_decap, bool,
	private_kernel_protego_ipsec_t *this, int fd, int family, uint16_t port)
{
	/* ESP-in-UDP is decapsulated by the GPNs, never on this node */
	return TRUE;
}

/**
 * Send the state dump and mark the connection ready (connection thread)
 */
static void send_dump(private_kernel_protego_ipsec_t *this,
					  kernel_protego_conn_t *conn)
{
	enumerator_t *enumerator;
	sa_entry_t *sa;
	policy_entry_t *policy;
	kp_msg_t *msg;
	time_t now = time_monotonic(NULL);
	u_int sas = 0, policies = 0;

	/* no change in flight meanwhile (the connection was not ready: every
	 * request made since failed at once and let go of the lock) */
	this->changes->write_lock(this->changes);
	this->mutex->lock(this->mutex);
	msg = kp_msg_create(KP_DUMP_BEGIN);
	kp_msg_add_u32(msg, KP_ATTR_SA_COUNT, this->sas->get_count(this->sas));
	kp_msg_add_u32(msg, KP_ATTR_POLICY_COUNT,
				   this->policies->get_count(this->policies));
	conn->send_unlocked(conn, msg);

	enumerator = this->sas->create_enumerator(this->sas);
	while (enumerator->enumerate(enumerator, &sa))
	{
		msg = kp_msg_create(KP_ADD_SA);
		msg->secret = TRUE;
		msg->writer->write_data(msg->writer, sa->attrs);
		kp_msg_add_u8(msg, KP_ATTR_DUMP, 1);
		kp_msg_add_u32(msg, KP_ATTR_AGE, now - sa->installed);
		conn->send_unlocked(conn, msg);
		sas++;
	}
	enumerator->destroy(enumerator);

	enumerator = this->policies->create_enumerator(this->policies);
	while (enumerator->enumerate(enumerator, &policy))
	{
		msg = kp_msg_create(KP_ADD_POLICY);
		msg->writer->write_data(msg->writer, policy->attrs);
		kp_msg_add_u8(msg, KP_ATTR_DUMP, 1);
		conn->send_unlocked(conn, msg);
		policies++;
	}
	enumerator->destroy(enumerator);

	msg = kp_msg_create(KP_DUMP_END);
	kp_msg_add_u32(msg, KP_ATTR_SA_COUNT, sas);
	kp_msg_add_u32(msg, KP_ATTR_POLICY_COUNT, policies);
	conn->send_unlocked(conn, msg);
	conn->set_ready(conn);
	this->mutex->unlock(this->mutex);
	this->changes->unlock(this->changes);

	DBG1(DBG_KNL, "kernel-protego: sent state dump to agent (%u SAs, %u "
		 "policies)", sas, policies);
}

/**
 * Handle an agent event (connection thread: must not take our mutex, a
 * worker may hold it while waiting for a reply this thread delivers)
 */
static void handle_event(private_kernel_protego_ipsec_t *this, kp_msg_t *msg)
{
	expire_job_t *job;
	uint32_t spi;
	uint8_t proto, hard = 0;
	host_t *dst;

	if (msg->type != KP_EXPIRE)
	{
		DBG1(DBG_KNL, "kernel-protego: ignoring unknown agent event %u",
			 msg->type);
		return;
	}
	dst = kp_msg_get_host(msg, KP_ATTR_DST);
	if (!dst || !kp_msg_get_u32(msg, KP_ATTR_SPI, &spi) ||
		!kp_msg_get_u8(msg, KP_ATTR_PROTO, &proto))
	{
		DBG1(DBG_KNL, "kernel-protego: ignoring malformed expire event");
		DESTROY_IF(dst);
		return;
	}
	kp_msg_get_u8(msg, KP_ATTR_HARD, &hard);
	INIT(job,
		.this = this,
		.hard = hard != 0,
		.spi = htonl(spi),
		.proto = proto,
		.dst = dst,
	);
	lib->processor->queue_job(lib->processor,
		(job_t*)callback_job_create((callback_job_cb_t)expire_event_cb, job,
					(callback_job_cleanup_t)expire_job_destroy, NULL));
}

METHOD(kernel_ipsec_t, destroy, void,
	private_kernel_protego_ipsec_t *this)
{
	this->conn->destroy(this->conn);
	this->sas->destroy_function(this->sas, (void*)sa_entry_destroy);
	this->policies->destroy_function(this->policies,
									 (void*)policy_entry_destroy);
	this->mutex->destroy(this->mutex);
	this->changes->destroy(this->changes);
	this->policy_mutex->destroy(this->policy_mutex);
	free(this);
}

/*
 * Described in header.
 */
kernel_protego_ipsec_t *kernel_protego_ipsec_create()
{
	private_kernel_protego_ipsec_t *this;
	char *path;
	u_int timeout, retry;

	path = lib->settings->get_str(lib->settings,
						"%s.plugins.kernel-protego.socket", DEFAULT_SOCKET,
						lib->ns);
	timeout = lib->settings->get_int(lib->settings,
						"%s.plugins.kernel-protego.timeout", DEFAULT_TIMEOUT_MS,
						lib->ns);
	retry = lib->settings->get_int(lib->settings,
						"%s.plugins.kernel-protego.retry_interval",
						DEFAULT_RETRY_MS, lib->ns);
	if (!path || !*path ||
		strlen(path) >= sizeof(((struct sockaddr_un*)0)->sun_path))
	{
		DBG1(DBG_KNL, "kernel-protego: invalid agent socket path");
		return NULL;
	}

	INIT(this,
		.public = {
			.interface = {
				.get_features = _get_features,
				.get_spi = _get_spi,
				.get_cpi = _get_cpi,
				.add_sa = _add_sa,
				.update_sa = _update_sa,
				.query_sa = _query_sa,
				.del_sa = _del_sa,
				.flush_sas = _flush_sas,
				.add_policy = _add_policy,
				.query_policy = _query_policy,
				.del_policy = _del_policy,
				.flush_policies = _flush_policies,
				.bypass_socket = _bypass_socket,
				.enable_udp_decap = _enable_udp_decap,
				.destroy = _destroy,
			},
		},
		.mutex = mutex_create(MUTEX_TYPE_DEFAULT),
		.changes = rwlock_create(RWLOCK_TYPE_DEFAULT),
		.policy_mutex = mutex_create(MUTEX_TYPE_DEFAULT),
		.sas = linked_list_create(),
		.policies = linked_list_create(),
	);

	this->conn = kernel_protego_conn_create(path, timeout, retry,
								(kp_connected_cb_t)send_dump,
								(kp_event_cb_t)handle_event, this);
	if (!this->conn)
	{
		this->sas->destroy(this->sas);
		this->policies->destroy(this->policies);
		this->mutex->destroy(this->mutex);
		this->changes->destroy(this->changes);
		this->policy_mutex->destroy(this->policy_mutex);
		free(this);
		return NULL;
	}
	DBG1(DBG_KNL, "kernel-protego: SAs and policies go to the Protego GMN "
		 "agent at %s", path);
	return &this->public;
}
