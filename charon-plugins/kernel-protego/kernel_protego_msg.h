/*
 * Protego kernel-protego plugin: wire codec of the plugin <-> agent protocol.
 *
 * See PROTOCOL.md next to this file; protego/gmn/plugin_protocol.py is the
 * agent's codec of the same protocol. This module does no I/O.
 */

/**
 * @defgroup kernel_protego_msg kernel_protego_msg
 * @{ @ingroup kernel_protego
 */

#ifndef KERNEL_PROTEGO_MSG_H_
#define KERNEL_PROTEGO_MSG_H_

#include <library.h>
#include <networking/host.h>
#include <selectors/traffic_selector.h>
#include <bio/bio_writer.h>

/** protocol version spoken by this plugin */
#define KP_VERSION_MAJOR 1
#define KP_VERSION_MINOR 0

/** version byte carried in every frame header */
#define KP_FRAME_VERSION 1

/** frame header after the length prefix: version, reserved, type, id */
#define KP_HEADER_LEN 8

/** largest frame body accepted (after the 4-byte length prefix) */
#define KP_MAX_FRAME (1024 * 1024)

typedef enum {
	KP_HELLO = 0x0001,
	KP_GET_SPI = 0x0002,
	KP_GET_CPI = 0x0003,
	KP_ADD_SA = 0x0004,
	KP_UPDATE_SA = 0x0005,
	KP_QUERY_SA = 0x0006,
	KP_DEL_SA = 0x0007,
	KP_FLUSH_SAS = 0x0008,
	KP_ADD_POLICY = 0x0009,
	KP_QUERY_POLICY = 0x000A,
	KP_DEL_POLICY = 0x000B,
	KP_FLUSH_POLICIES = 0x000C,
	KP_DUMP_BEGIN = 0x000D,
	KP_DUMP_END = 0x000E,
	KP_EXPIRE = 0x0040,
	KP_REPLY = 0x8000,
} kp_msg_type_t;

typedef enum {
	KP_ATTR_VERSION = 1,
	KP_ATTR_SOFTWARE = 2,
	KP_ATTR_STATUS = 3,
	KP_ATTR_ERROR = 4,
	KP_ATTR_PID = 5,
	KP_ATTR_SRC = 10,
	KP_ATTR_DST = 11,
	KP_ATTR_SPI = 12,
	KP_ATTR_PROTO = 13,
	KP_ATTR_CPI = 14,
	KP_ATTR_MARK = 15,
	KP_ATTR_IF_ID = 16,
	KP_ATTR_REQID = 17,
	KP_ATTR_MODE = 18,
	KP_ATTR_SRC_TS = 19,
	KP_ATTR_DST_TS = 20,
	KP_ATTR_INTERFACE = 21,
	KP_ATTR_LIFETIME = 22,
	KP_ATTR_ENC_ALG = 23,
	KP_ATTR_ENC_KEY = 24,
	KP_ATTR_INT_ALG = 25,
	KP_ATTR_INT_KEY = 26,
	KP_ATTR_REPLAY_WINDOW = 27,
	KP_ATTR_TFC = 28,
	KP_ATTR_IPCOMP = 29,
	KP_ATTR_HW_OFFLOAD = 30,
	KP_ATTR_COPY_DSCP = 31,
	KP_ATTR_LABEL = 32,
	KP_ATTR_SA_FLAGS = 33,
	KP_ATTR_NEW_SRC = 34,
	KP_ATTR_NEW_DST = 35,
	KP_ATTR_NEW_REQID = 36,
	KP_ATTR_BYTES = 37,
	KP_ATTR_PACKETS = 38,
	KP_ATTR_IDLE = 39,
	KP_ATTR_POLICY_DIR = 40,
	KP_ATTR_POLICY_TYPE = 41,
	KP_ATTR_POLICY_PRIO = 42,
	KP_ATTR_MANUAL_PRIO = 43,
	KP_ATTR_ESP_SPI = 44,
	KP_ATTR_AH_SPI = 45,
	KP_ATTR_HARD = 47,
	KP_ATTR_DUMP = 48,
	KP_ATTR_SA_COUNT = 49,
	KP_ATTR_POLICY_COUNT = 50,
	KP_ATTR_AGE = 51,
	KP_ATTR_SET_MARK = 52,
} kp_attr_type_t;

/** KP_ATTR_SA_FLAGS bits */
typedef enum {
	KP_SA_ENCAP = (1<<0),
	KP_SA_ESN = (1<<1),
	KP_SA_COPY_DF = (1<<2),
	KP_SA_COPY_ECN = (1<<3),
	KP_SA_INITIATOR = (1<<4),
	KP_SA_INBOUND = (1<<5),
	KP_SA_UPDATE = (1<<6),
	KP_SA_NEW_ENCAP = (1<<7),
} kp_sa_flag_t;

/** KP_ATTR_STATUS values */
typedef enum {
	KP_STATUS_OK = 0,
	KP_STATUS_FAILED = 1,
	KP_STATUS_NOT_FOUND = 2,
	KP_STATUS_NOT_SUPPORTED = 3,
	KP_STATUS_INVALID = 4,
	KP_STATUS_VERSION = 5,
} kp_status_t;

typedef struct kp_msg_t kp_msg_t;

/**
 * A message being built or a received message (type, id, attributes).
 */
struct kp_msg_t {
	/** message type, kp_msg_type_t, KP_REPLY bit set for replies */
	uint16_t type;
	/** request id, 0 if no reply is expected */
	uint32_t id;
	/** encoded attributes (TLVs) */
	chunk_t attrs;
	/** writer while building, NULL for parsed messages */
	bio_writer_t *writer;
	/** TRUE if attrs may hold key material (wiped on destroy) */
	bool secret;
};

/** create an empty message to build */
kp_msg_t *kp_msg_create(uint16_t type);

/** add attributes */
void kp_msg_add_u8(kp_msg_t *msg, uint16_t attr, uint8_t value);
void kp_msg_add_u16(kp_msg_t *msg, uint16_t attr, uint16_t value);
void kp_msg_add_u32(kp_msg_t *msg, uint16_t attr, uint32_t value);
void kp_msg_add_u64(kp_msg_t *msg, uint16_t attr, uint64_t value);
void kp_msg_add_data(kp_msg_t *msg, uint16_t attr, chunk_t value);
void kp_msg_add_string(kp_msg_t *msg, uint16_t attr, char *value);
/** key material: marks the message secret so its buffers are wiped */
void kp_msg_add_secret(kp_msg_t *msg, uint16_t attr, chunk_t value);
void kp_msg_add_host(kp_msg_t *msg, uint16_t attr, host_t *host);
void kp_msg_add_ts(kp_msg_t *msg, uint16_t attr, traffic_selector_t *ts);
void kp_msg_add_mark(kp_msg_t *msg, uint16_t attr, uint32_t value,
					 uint32_t mask);

/**
 * Encode a frame: 4-byte length prefix, header and attributes (allocated,
 * caller frees with chunk_clear() if the message is secret).
 */
chunk_t kp_msg_encode(kp_msg_t *msg);

/**
 * Parse a frame body (without the length prefix), NULL if malformed.
 */
kp_msg_t *kp_msg_parse(chunk_t body);

/** look up the first attribute of a type */
bool kp_msg_get(kp_msg_t *msg, uint16_t attr, chunk_t *value);
bool kp_msg_get_u8(kp_msg_t *msg, uint16_t attr, uint8_t *value);
bool kp_msg_get_u16(kp_msg_t *msg, uint16_t attr, uint16_t *value);
bool kp_msg_get_u32(kp_msg_t *msg, uint16_t attr, uint32_t *value);
bool kp_msg_get_u64(kp_msg_t *msg, uint16_t attr, uint64_t *value);
/** returns a new host_t or NULL */
host_t *kp_msg_get_host(kp_msg_t *msg, uint16_t attr);

/** destroy a message, wiping secret buffers */
void kp_msg_destroy(kp_msg_t *msg);

#endif /** KERNEL_PROTEGO_MSG_H_ @}*/
