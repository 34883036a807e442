/*
 * Protego kernel-protego plugin: charon's kernel_ipsec_t backed by the
 * local Protego GMN agent.
 */

/**
 * @defgroup kernel_protego_ipsec kernel_protego_ipsec
 * @{ @ingroup kernel_protego
 */

#ifndef KERNEL_PROTEGO_IPSEC_H_
#define KERNEL_PROTEGO_IPSEC_H_

#include <kernel/kernel_ipsec.h>

typedef struct kernel_protego_ipsec_t kernel_protego_ipsec_t;

/**
 * Implementation of the kernel ipsec interface that hands every SA and
 * policy to the Protego GMN agent over a unix socket.
 */
struct kernel_protego_ipsec_t {

	/**
	 * Implements kernel_ipsec_t interface
	 */
	kernel_ipsec_t interface;
};

/**
 * Create the kernel-protego ipsec interface (reads its settings from
 * charon.plugins.kernel-protego).
 *
 * @return			kernel_protego_ipsec_t instance, NULL on error
 */
kernel_protego_ipsec_t *kernel_protego_ipsec_create();

#endif /** KERNEL_PROTEGO_IPSEC_H_ @}*/
