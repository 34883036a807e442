/*
 * ABI smoke test for out-of-tree charon plugins built against Debian's
 * strongSwan headers with charon-plugins/strongswan-config.h.
 *
 * Debian builds strongSwan with mediation (ME). A plugin built without ME
 * sees shorter ike_sa_t/peer_cfg_t vtables and calls land in the wrong
 * methods, silently. This program, built exactly like the plugin and run
 * against the installed libstrongswan/libcharon:
 *  1. runs the plugin's own check (kernel_protego_abi_check() from the built
 *     libstrongswan-kernel-protego.so: peer_cfg_t methods before, inside and
 *     after the ME block);
 *  2. creates an ike_sa_t with ike_sa_create(), attaches a peer_cfg_t and
 *     calls methods after the ME block (get_if_id, get_child_count,
 *     get_keymat) checking the values they must return.
 * Each check runs in a child process so a wrong layout that crashes is
 * reported as a failure, not a silent abort. Exit status 0 = layouts match.
 */

#include <stdio.h>
#include <unistd.h>
#include <sys/wait.h>

#include <library.h>
#include <daemon.h>
#include <sa/ike_sa.h>
#include <config/peer_cfg.h>

#include "kernel_protego_plugin.h"

static int check_plugin(void)
{
	const char *err = NULL;

	if (!kernel_protego_abi_check(&err))
	{
		fprintf(stderr, "FAIL plugin peer_cfg_t check: %s\n", err);
		return 1;
	}
	printf("ok   peer_cfg_t: get_name/get_if_id (before ME), is_mediation/"
		   "get_mediated_by (ME), get_ref/equals (after ME)\n");
	return 0;
}

static int check_ike_sa(void)
{
	peer_cfg_create_t data = {
		.cert_policy = CERT_ALWAYS_SEND,
		.unique = UNIQUE_NO,
		.keyingtries = 1,
		.if_id_in = 0x1234,
		.if_id_out = 0x5678,
	};
	ike_cfg_create_t ike = {
		.version = IKEV2,
		.local = "127.0.0.1",
		.remote = "127.0.0.2",
		.local_port = 500,
		.remote_port = 500,
	};
	ike_sa_id_t *id;
	ike_sa_t *ike_sa;
	peer_cfg_t *cfg;
	keymat_t *keymat;
	uint32_t in, out;
	u_int children;

	cfg = peer_cfg_create("protego-abi-ike", ike_cfg_create(&ike), &data);
	id = ike_sa_id_create(IKEV2, 0x1122334455667788ULL, 0, TRUE);
	ike_sa = ike_sa_create(id, TRUE, IKEV2);
	if (!ike_sa)
	{
		fprintf(stderr, "FAIL ike_sa_create() returned NULL\n");
		return 1;
	}
	ike_sa->set_peer_cfg(ike_sa, cfg);
	/* before the ME block */
	if (!streq(ike_sa->get_name(ike_sa), "protego-abi-ike"))
	{
		fprintf(stderr, "FAIL ike_sa_t->get_name() is wrong\n");
		return 1;
	}
	/* after the ME block */
	in = ike_sa->get_if_id(ike_sa, TRUE);
	out = ike_sa->get_if_id(ike_sa, FALSE);
	children = ike_sa->get_child_count(ike_sa);
	keymat = ike_sa->get_keymat(ike_sa);
	if (in != 0x1234 || out != 0x5678)
	{
		fprintf(stderr, "FAIL ike_sa_t->get_if_id() (after ME) returned "
				"0x%x/0x%x, expected 0x1234/0x5678\n", in, out);
		return 1;
	}
	if (children != 0)
	{
		fprintf(stderr, "FAIL ike_sa_t->get_child_count() (after ME) "
				"returned %u\n", children);
		return 1;
	}
	if (!keymat || keymat->get_version(keymat) != IKEV2)
	{
		fprintf(stderr, "FAIL ike_sa_t->get_keymat() (after ME) is wrong\n");
		return 1;
	}
	printf("ok   ike_sa_t: get_name (before ME), get_if_id=0x%x/0x%x, "
		   "get_child_count=%u, get_keymat()->get_version=IKEv2 (after ME)\n",
		   in, out, children);
	ike_sa->destroy(ike_sa);
	id->destroy(id);
	cfg->destroy(cfg);
	return 0;
}

static int run_isolated(const char *name, int (*check)(void))
{
	int status;
	pid_t pid;

	fflush(stdout);
	pid = fork();
	if (pid == 0)
	{
		int rc = check();

		fflush(stdout);
		_exit(rc);
	}
	if (pid < 0 || waitpid(pid, &status, 0) != pid)
	{
		fprintf(stderr, "FAIL %s: could not run\n", name);
		return 1;
	}
	if (WIFSIGNALED(status))
	{
		fprintf(stderr, "FAIL %s: crashed with signal %d (struct layout "
				"mismatch?)\n", name, WTERMSIG(status));
		return 1;
	}
	return WEXITSTATUS(status) != 0;
}

int main(int argc, char *argv[])
{
	int failed = 0;

	if (!library_init(NULL, "charon"))
	{
		fprintf(stderr, "FAIL library_init()\n");
		return 2;
	}
	if (!libcharon_init())
	{
		fprintf(stderr, "FAIL libcharon_init()\n");
		return 2;
	}
	failed += run_isolated("plugin peer_cfg_t check", check_plugin);
	failed += run_isolated("ike_sa_t check", check_ike_sa);
	if (failed)
	{
		fprintf(stderr, "ABI smoke test FAILED: the plugin's view of "
				"libcharon's structs is wrong\n");
		return 1;
	}
	printf("ABI smoke test passed\n");
	return 0;
}
