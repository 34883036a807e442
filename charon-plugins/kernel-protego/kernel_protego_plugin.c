/*
 * Protego kernel-protego plugin: constructor and features.
 *
 * The constructor refuses to start when the plugin was built against
 * headers whose layout differs from the running libcharon (the ABI check
 * below) or when its settings are unusable (see kernel_protego_ipsec.c).
 */

#include "kernel_protego_plugin.h"
#include "kernel_protego_ipsec.h"

#include <daemon.h>
#include <config/peer_cfg.h>

typedef struct private_kernel_protego_plugin_t private_kernel_protego_plugin_t;

/**
 * private data of the kernel-protego plugin
 */
struct private_kernel_protego_plugin_t {

	/**
	 * implements plugin interface
	 */
	kernel_protego_plugin_t public;
};

METHOD(plugin_t, get_name, char*,
	private_kernel_protego_plugin_t *this)
{
	return "kernel-protego";
}

METHOD(plugin_t, get_features, int,
	private_kernel_protego_plugin_t *this, plugin_feature_t *features[])
{
	static plugin_feature_t f[] = {
		PLUGIN_CALLBACK(kernel_ipsec_register, kernel_protego_ipsec_create),
			PLUGIN_PROVIDE(CUSTOM, "kernel-ipsec"),
	};
	*features = f;
	return countof(f);
}

METHOD(plugin_t, destroy, void,
	private_kernel_protego_plugin_t *this)
{
	free(this);
}

/*
 * See header
 */
bool kernel_protego_abi_check(const char **err)
{
	peer_cfg_create_t data = {
		.cert_policy = CERT_ALWAYS_SEND,
		.unique = UNIQUE_NO,
		.keyingtries = 7,
		.rekey_time = 3600,
		.if_id_in = 0x1234,
		.if_id_out = 0x5678,
#ifdef ME
		.mediation = TRUE,
		.mediated_by = "protego-abi-mediator",
#endif
	};
	peer_cfg_t *cfg, *ref;
	ike_cfg_t *ike_cfg;
	ike_cfg_create_t ike = {
		.version = IKEV2,
		.local = "127.0.0.1",
		.remote = "127.0.0.2",
		.local_port = 500,
		.remote_port = 500,
	};
	bool ok = FALSE;

	ike_cfg = ike_cfg_create(&ike);
	cfg = peer_cfg_create("protego-abi-check", ike_cfg, &data);
	*err = NULL;
	/* before the ME block: layout-independent sanity */
	if (!streq(cfg->get_name(cfg), "protego-abi-check") ||
		cfg->get_keyingtries(cfg) != 7 ||
		cfg->get_if_id(cfg, TRUE) != 0x1234 ||
		cfg->get_if_id(cfg, FALSE) != 0x5678)
	{
		*err = "peer_cfg_t methods before the ME block return wrong values";
	}
#ifdef ME
	/* the ME block itself, fed from the ME fields of peer_cfg_create_t */
	else if (!cfg->is_mediation(cfg) || !cfg->get_mediated_by(cfg) ||
			 !streq(cfg->get_mediated_by(cfg), "protego-abi-mediator"))
	{
		*err = "peer_cfg_t mediation methods return wrong values";
	}
#endif
	/* after the ME block: get_ref() and equals() */
	else if ((ref = cfg->get_ref(cfg)) != cfg)
	{
		*err = "peer_cfg_t->get_ref() (after the ME block) did not return "
			   "the object";
	}
	else
	{
		cfg->destroy(ref);
		if (!cfg->equals(cfg, cfg))
		{
			*err = "peer_cfg_t->equals() (after the ME block) is wrong";
		}
		else
		{
			ok = TRUE;
		}
	}
	cfg->destroy(cfg);
	return ok;
}

/*
 * see header file
 */
plugin_t *kernel_protego_plugin_create()
{
	private_kernel_protego_plugin_t *this;
	const char *err;

	if (!kernel_protego_abi_check(&err))
	{
		DBG1(DBG_KNL, "kernel-protego: ABI check failed: %s; rebuild the "
			 "plugin against this strongSwan (charon-plugins/build.sh)", err);
		return NULL;
	}

	INIT(this,
		.public = {
			.plugin = {
				.get_name = _get_name,
				.get_features = _get_features,
				.destroy = _destroy,
			},
		},
	);
	return &this->public.plugin;
}
