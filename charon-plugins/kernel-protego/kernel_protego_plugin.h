/*
 * Protego kernel-protego plugin: charon's kernel-ipsec interface provided by
 * the local Protego GMN agent (see PROTOCOL.md).
 */

/**
 * @defgroup kernel_protego kernel_protego
 * @ingroup cplugins
 *
 * @defgroup kernel_protego_plugin kernel_protego_plugin
 * @{ @ingroup kernel_protego
 */

#ifndef KERNEL_PROTEGO_PLUGIN_H_
#define KERNEL_PROTEGO_PLUGIN_H_

#include <library.h>
#include <plugins/plugin.h>

typedef struct kernel_protego_plugin_t kernel_protego_plugin_t;

/**
 * Plugin providing charon's kernel-ipsec interface through the Protego agent.
 */
struct kernel_protego_plugin_t {

	/**
	 * implements plugin interface
	 */
	plugin_t plugin;
};

/**
 * Check at run time that this plugin was built with the struct layouts of
 * the libcharon it runs in (Debian builds with mediation: ME must be
 * defined). Calls peer_cfg_t methods that sit after the "#ifdef ME" block.
 *
 * @param err		set to a static description of the first failed check
 * @return			TRUE if the layouts match
 */
bool kernel_protego_abi_check(const char **err);

#endif /** KERNEL_PROTEGO_PLUGIN_H_ @}*/
