/*
 * Protego kernel-protego plugin: the unix stream connection to the local
 * Protego GMN agent (connect, hello, reconnect, request/reply, events).
 */

/**
 * @defgroup kernel_protego_conn kernel_protego_conn
 * @{ @ingroup kernel_protego
 */

#ifndef KERNEL_PROTEGO_CONN_H_
#define KERNEL_PROTEGO_CONN_H_

#include "kernel_protego_msg.h"

typedef struct kernel_protego_conn_t kernel_protego_conn_t;

/**
 * Called on the connection thread after each successful hello, before the
 * connection accepts requests. The callee sends its state dump with
 * send_unlocked() and then calls set_ready() (both while holding its own
 * lock, so no state change can slip between the dump and readiness).
 */
typedef void (*kp_connected_cb_t)(void *data, kernel_protego_conn_t *conn);

/**
 * Called on the connection thread for each event (request id 0, no reply)
 * the agent sends. The message is destroyed after the call.
 */
typedef void (*kp_event_cb_t)(void *data, kp_msg_t *event);

struct kernel_protego_conn_t {

	/**
	 * Send a request and wait for its reply.
	 *
	 * Fails at once (returns NULL) while the agent is not connected; waits
	 * at most the configured timeout for the reply.
	 *
	 * @param msg		request, destroyed by this call
	 * @return			reply (destroy it), NULL if not connected/timed out
	 */
	kp_msg_t *(*request)(kernel_protego_conn_t *this, kp_msg_t *msg);

	/**
	 * Send a message that expects no reply (id 0) from the connected
	 * callback, before set_ready() was called.
	 *
	 * @param msg		message, destroyed by this call
	 * @return			TRUE if written
	 */
	bool (*send_unlocked)(kernel_protego_conn_t *this, kp_msg_t *msg);

	/**
	 * Mark the connection ready for requests (from the connected callback).
	 */
	void (*set_ready)(kernel_protego_conn_t *this);

	/**
	 * Whether the agent is connected and the dump was sent.
	 */
	bool (*is_ready)(kernel_protego_conn_t *this);

	/**
	 * Stop the connection thread and close the socket.
	 */
	void (*destroy)(kernel_protego_conn_t *this);
};

/**
 * Create the connection and start its thread (it connects, and reconnects
 * after any error, every retry_ms).
 *
 * @param path			unix socket path of the agent
 * @param timeout_ms	how long a request waits for its reply
 * @param retry_ms		reconnect interval
 * @param connected		callback after each (re)connect
 * @param event			callback for agent events
 * @param data			user data for the callbacks
 */
kernel_protego_conn_t *kernel_protego_conn_create(char *path, u_int timeout_ms,
							u_int retry_ms, kp_connected_cb_t connected,
							kp_event_cb_t event, void *data);

#endif /** KERNEL_PROTEGO_CONN_H_ @}*/
