/*
 * Fuzzer for the kernel-protego wire codec (kernel_protego_msg.c), run by
 * tests/unit/test_plugin_codec_fuzz.py with AddressSanitizer and
 * UndefinedBehaviorSanitizer (any report aborts: exit status != 0).
 *
 * Usage: fuzz_msg ITERATIONS SEED
 *
 * Each iteration builds a well-formed message (every attribute kind the plugin
 * writes: integers, data, strings, secrets, hosts of both families, traffic
 * selectors, marks), encodes it, damages the frame (bytes flipped, cut short,
 * extended with junk, an attribute length rewritten) or replaces it with
 * random bytes, and hands the body to kp_msg_parse(); a parsed message has
 * every attribute read back with every getter. The codec must neither read
 * nor write out of bounds, nor leak (LeakSanitizer at exit).
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <library.h>

#include "kernel_protego_msg.h"

static uint64_t rng;

static uint32_t next(void)
{
	/* xorshift64: reproducible from the seed, no libc state */
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return (uint32_t)(rng >> 16);
}

static void fill(u_char *buf, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++)
	{
		buf[i] = next() & 0xff;
	}
}

static chunk_t build(void)
{
	static const char *hosts[] = { "198.18.1.1", "203.0.113.11", "2001:db8::1", "::" };
	static const char *nets[] = { "10.1.0.0/24", "0.0.0.0/0", "2001:db8::/64", "10.201.0.7/32" };
	kp_msg_t *msg;
	host_t *host;
	traffic_selector_t *ts;
	u_char data[96];
	char text[48];
	chunk_t frame;
	int i, n;

	msg = kp_msg_create(next() % 24);
	msg->id = next();
	n = next() % 12;
	for (i = 0; i < n; i++)
	{
		uint16_t attr = next() % 40;

		switch (next() % 9)
		{
			case 0:
				kp_msg_add_u8(msg, attr, next());
				break;
			case 1:
				kp_msg_add_u16(msg, attr, next());
				break;
			case 2:
				kp_msg_add_u32(msg, attr, next());
				break;
			case 3:
				kp_msg_add_u64(msg, attr, ((uint64_t)next() << 32) | next());
				break;
			case 4:
				fill(data, sizeof(data));
				kp_msg_add_data(msg, attr, chunk_create(data, next() % sizeof(data)));
				break;
			case 5:
				snprintf(text, sizeof(text), "charon-%u", next());
				kp_msg_add_string(msg, attr, text);
				break;
			case 6:
				host = host_create_from_string((char*)hosts[next() % countof(hosts)], next() % 65536);
				kp_msg_add_host(msg, attr, host);
				DESTROY_IF(host);
				break;
			case 7:
				ts = traffic_selector_create_from_cidr((char*)nets[next() % countof(nets)],
													   next() % 256, 0, 65535);
				kp_msg_add_ts(msg, attr, ts);
				DESTROY_IF(ts);
				break;
			default:
				kp_msg_add_mark(msg, attr, next(), next());
				break;
		}
	}
	if (next() % 3 == 0)
	{
		fill(data, 36);
		kp_msg_add_secret(msg, 30 + next() % 4, chunk_create(data, 16 + next() % 21));
	}
	frame = kp_msg_encode(msg);
	kp_msg_destroy(msg);
	return frame;
}

static void damage(chunk_t *frame)
{
	size_t i, n;

	switch (next() % 5)
	{
		case 0:  /* bytes flipped */
			n = 1 + next() % 4;
			for (i = 0; i < n && frame->len; i++)
			{
				frame->ptr[next() % frame->len] ^= 1 << (next() % 8);
			}
			break;
		case 1:  /* cut short */
			frame->len = next() % (frame->len + 1);
			break;
		case 2:  /* junk appended */
			n = 1 + next() % 64;
			frame->ptr = realloc(frame->ptr, frame->len + n);
			fill(frame->ptr + frame->len, n);
			frame->len += n;
			break;
		case 3:  /* a 16-bit length (or type) rewritten */
			if (frame->len >= 2)
			{
				i = next() % (frame->len - 1);
				frame->ptr[i] = next();
				frame->ptr[i + 1] = next();
			}
			break;
		default:  /* well formed */
			break;
	}
}

static int read_back(kp_msg_t *msg)
{
	chunk_t value;
	uint8_t u8;
	uint16_t u16;
	uint32_t u32;
	uint64_t u64;
	host_t *host;
	int attr, found = 0;

	for (attr = 0; attr < 42; attr++)
	{
		found += kp_msg_get(msg, attr, &value);
		kp_msg_get_u8(msg, attr, &u8);
		kp_msg_get_u16(msg, attr, &u16);
		kp_msg_get_u32(msg, attr, &u32);
		kp_msg_get_u64(msg, attr, &u64);
		host = kp_msg_get_host(msg, attr);
		DESTROY_IF(host);
	}
	kp_msg_get(msg, next(), &value);
	return found;
}

int main(int argc, char *argv[])
{
	unsigned long i, iterations, parsed = 0, attrs = 0;
	chunk_t frame, body;

	if (argc != 3)
	{
		fprintf(stderr, "usage: %s ITERATIONS SEED\n", argv[0]);
		return 2;
	}
	iterations = strtoul(argv[1], NULL, 10);
	rng = strtoull(argv[2], NULL, 10) | 1;
	library_init(NULL, "kp-fuzz");
	for (i = 0; i < iterations; i++)
	{
		kp_msg_t *msg;

		if (next() % 8 == 0)
		{  /* random bytes */
			frame = chunk_alloc(next() % 128);
			fill(frame.ptr, frame.len);
		}
		else
		{
			frame = build();
			damage(&frame);
		}
		/* the plugin hands the parser what follows the 4-byte frame length */
		body = frame.len >= 4 ? chunk_skip(frame, 4) : frame;
		msg = kp_msg_parse(body);
		if (msg)
		{
			parsed++;
			attrs += read_back(msg);
			kp_msg_destroy(msg);
		}
		free(frame.ptr);
	}
	library_deinit();
	printf("iterations %lu parsed %lu attributes %lu\n", iterations, parsed, attrs);
	return 0;
}
