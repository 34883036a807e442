/*
 * Protego kernel-protego plugin: wire codec (no I/O). See PROTOCOL.md.
 */

#include "kernel_protego_msg.h"

#include <bio/bio_writer.h>
#include <bio/bio_reader.h>

/* large enough that an add_sa message with a few traffic selectors never
 * reallocates (a realloc would leave an unwiped copy of the keys behind);
 * keys are added last for the same reason */
#define KP_INITIAL_BUF 2048

kp_msg_t *kp_msg_create(uint16_t type)
{
	kp_msg_t *msg;

	INIT(msg,
		.type = type,
		.writer = bio_writer_create(KP_INITIAL_BUF),
	);
	return msg;
}

static void add_header(kp_msg_t *msg, uint16_t attr, uint16_t len)
{
	msg->writer->write_uint16(msg->writer, attr);
	msg->writer->write_uint16(msg->writer, len);
}

void kp_msg_add_u8(kp_msg_t *msg, uint16_t attr, uint8_t value)
{
	add_header(msg, attr, 1);
	msg->writer->write_uint8(msg->writer, value);
}

void kp_msg_add_u16(kp_msg_t *msg, uint16_t attr, uint16_t value)
{
	add_header(msg, attr, 2);
	msg->writer->write_uint16(msg->writer, value);
}

void kp_msg_add_u32(kp_msg_t *msg, uint16_t attr, uint32_t value)
{
	add_header(msg, attr, 4);
	msg->writer->write_uint32(msg->writer, value);
}

void kp_msg_add_u64(kp_msg_t *msg, uint16_t attr, uint64_t value)
{
	add_header(msg, attr, 8);
	msg->writer->write_uint64(msg->writer, value);
}

void kp_msg_add_data(kp_msg_t *msg, uint16_t attr, chunk_t value)
{
	if (value.len > 0xFFFF)
	{
		value.len = 0xFFFF;
	}
	add_header(msg, attr, value.len);
	msg->writer->write_data(msg->writer, value);
}

void kp_msg_add_string(kp_msg_t *msg, uint16_t attr, char *value)
{
	kp_msg_add_data(msg, attr, chunk_from_str(value ?: ""));
}

void kp_msg_add_secret(kp_msg_t *msg, uint16_t attr, chunk_t value)
{
	msg->secret = TRUE;
	kp_msg_add_data(msg, attr, value);
}

static uint8_t family_code(int family)
{
	return family == AF_INET6 ? 6 : 4;
}

void kp_msg_add_host(kp_msg_t *msg, uint16_t attr, host_t *host)
{
	chunk_t addr;

	if (!host)
	{
		return;
	}
	addr = host->get_address(host);
	add_header(msg, attr, 3 + addr.len);
	msg->writer->write_uint8(msg->writer, family_code(host->get_family(host)));
	msg->writer->write_uint16(msg->writer, host->get_port(host));
	msg->writer->write_data(msg->writer, addr);
}

void kp_msg_add_ts(kp_msg_t *msg, uint16_t attr, traffic_selector_t *ts)
{
	chunk_t from, to;

	if (!ts)
	{
		return;
	}
	from = ts->get_from_address(ts);
	to = ts->get_to_address(ts);
	add_header(msg, attr, 6 + from.len + to.len);
	msg->writer->write_uint8(msg->writer, ts->get_type(ts));
	msg->writer->write_uint8(msg->writer, ts->get_protocol(ts));
	msg->writer->write_uint16(msg->writer, ts->get_from_port(ts));
	msg->writer->write_uint16(msg->writer, ts->get_to_port(ts));
	msg->writer->write_data(msg->writer, from);
	msg->writer->write_data(msg->writer, to);
}

void kp_msg_add_mark(kp_msg_t *msg, uint16_t attr, uint32_t value,
					 uint32_t mask)
{
	add_header(msg, attr, 8);
	msg->writer->write_uint32(msg->writer, value);
	msg->writer->write_uint32(msg->writer, mask);
}

chunk_t kp_msg_encode(kp_msg_t *msg)
{
	chunk_t attrs = msg->writer ? msg->writer->get_buf(msg->writer)
								: msg->attrs;
	chunk_t frame;
	bio_writer_t *writer;

	writer = bio_writer_create(4 + KP_HEADER_LEN + attrs.len);
	writer->write_uint32(writer, KP_HEADER_LEN + attrs.len);
	writer->write_uint8(writer, KP_FRAME_VERSION);
	writer->write_uint8(writer, 0);
	writer->write_uint16(writer, msg->type);
	writer->write_uint32(writer, msg->id);
	writer->write_data(writer, attrs);
	frame = writer->extract_buf(writer);
	writer->destroy(writer);
	return frame;
}

/**
 * Check that an attribute list is well formed
 */
static bool attrs_valid(chunk_t attrs)
{
	bio_reader_t *reader;
	uint16_t type;
	chunk_t value;
	bool ok = TRUE;

	reader = bio_reader_create(attrs);
	while (reader->remaining(reader))
	{
		if (!reader->read_uint16(reader, &type) ||
			!reader->read_data16(reader, &value))
		{
			ok = FALSE;
			break;
		}
	}
	reader->destroy(reader);
	return ok;
}

kp_msg_t *kp_msg_parse(chunk_t body)
{
	bio_reader_t *reader;
	kp_msg_t *msg;
	uint8_t version, reserved;
	uint16_t type;
	uint32_t id;

	reader = bio_reader_create(body);
	if (!reader->read_uint8(reader, &version) ||
		!reader->read_uint8(reader, &reserved) ||
		!reader->read_uint16(reader, &type) ||
		!reader->read_uint32(reader, &id) ||
		version != KP_FRAME_VERSION)
	{
		reader->destroy(reader);
		return NULL;
	}
	body = reader->peek(reader);
	reader->destroy(reader);
	if (!attrs_valid(body))
	{
		return NULL;
	}
	INIT(msg,
		.type = type,
		.id = id,
		.attrs = chunk_clone(body),
	);
	return msg;
}

bool kp_msg_get(kp_msg_t *msg, uint16_t attr, chunk_t *value)
{
	bio_reader_t *reader;
	uint16_t type;
	chunk_t data;
	bool found = FALSE;

	reader = bio_reader_create(msg->attrs);
	while (reader->remaining(reader))
	{
		if (!reader->read_uint16(reader, &type) ||
			!reader->read_data16(reader, &data))
		{
			break;
		}
		if (type == attr)
		{
			*value = data;
			found = TRUE;
			break;
		}
	}
	reader->destroy(reader);
	return found;
}

bool kp_msg_get_u8(kp_msg_t *msg, uint16_t attr, uint8_t *value)
{
	chunk_t data;

	if (!kp_msg_get(msg, attr, &data) || data.len != 1)
	{
		return FALSE;
	}
	*value = data.ptr[0];
	return TRUE;
}

bool kp_msg_get_u16(kp_msg_t *msg, uint16_t attr, uint16_t *value)
{
	chunk_t data;

	if (!kp_msg_get(msg, attr, &data) || data.len != 2)
	{
		return FALSE;
	}
	*value = untoh16(data.ptr);
	return TRUE;
}

bool kp_msg_get_u32(kp_msg_t *msg, uint16_t attr, uint32_t *value)
{
	chunk_t data;

	if (!kp_msg_get(msg, attr, &data) || data.len != 4)
	{
		return FALSE;
	}
	*value = untoh32(data.ptr);
	return TRUE;
}

bool kp_msg_get_u64(kp_msg_t *msg, uint16_t attr, uint64_t *value)
{
	chunk_t data;

	if (!kp_msg_get(msg, attr, &data) || data.len != 8)
	{
		return FALSE;
	}
	*value = untoh64(data.ptr);
	return TRUE;
}

host_t *kp_msg_get_host(kp_msg_t *msg, uint16_t attr)
{
	chunk_t data;
	int family;

	if (!kp_msg_get(msg, attr, &data) || data.len < 3)
	{
		return NULL;
	}
	switch (data.ptr[0])
	{
		case 4:
			family = AF_INET;
			if (data.len != 3 + 4)
			{
				return NULL;
			}
			break;
		case 6:
			family = AF_INET6;
			if (data.len != 3 + 16)
			{
				return NULL;
			}
			break;
		default:
			return NULL;
	}
	return host_create_from_chunk(family, chunk_skip(data, 3),
								  untoh16(data.ptr + 1));
}

void kp_msg_destroy(kp_msg_t *msg)
{
	if (msg)
	{
		if (msg->writer)
		{
			chunk_t buf = msg->writer->extract_buf(msg->writer);

			if (msg->secret)
			{
				chunk_clear(&buf);
			}
			else
			{
				chunk_free(&buf);
			}
			msg->writer->destroy(msg->writer);
		}
		if (msg->secret)
		{
			chunk_clear(&msg->attrs);
		}
		else
		{
			chunk_free(&msg->attrs);
		}
		free(msg);
	}
}
