/*
 * Hand-written replacement for strongSwan's generated config.h, for building
 * out-of-tree charon plugins against the headers of Debian's strongSwan 5.9.8
 * (bookworm, amd64) without running ./configure.
 *
 * Only macros that change what the public libstrongswan/libcharon headers
 * declare (struct and vtable layouts, inline helpers) matter here. Each one
 * below matches what Debian's configure (debian/rules CONFIGUREARGS) defines
 * on this platform; the values were checked against a reference ./configure
 * run of the same source.
 *
 * ABI trap: Debian builds with --enable-mediation, so ME must be defined.
 * Without it ike_sa_t, peer_cfg_t, peer_cfg_create_t and daemon_t shrink and
 * every call after the "#ifdef ME" blocks lands in the wrong method. The ABI
 * smoke test (abi_smoke.c) and the plugin's constructor check this at run time.
 */
#ifndef PROTEGO_STRONGSWAN_CONFIG_H
#define PROTEGO_STRONGSWAN_CONFIG_H

#define CONFIG_H_INCLUDED

/* IKE versions and mediation (--enable-mediation): layout relevant */
#define USE_IKEV1
#define USE_IKEV2
#ifndef PROTEGO_ABI_NEGATIVE_CONTROL	/* only build.sh's negative control */
#define ME
#endif

/* compiler / libc features used by inline helpers in the headers */
#define HAVE_STDBOOL_H 1
#define HAVE__BOOL 1
#define HAVE_STDINT_H 1
#define HAVE_INTTYPES_H 1
#define HAVE_SYS_PARAM_H 1
#define HAVE_ALLOCA_H 1
#define HAVE_INT128
#define HAVE_GCC_SYNC_OPERATIONS
#define HAVE_CLOCK_GETTIME 1
#define HAVE_CONDATTR_CLOCK_MONOTONIC
#define HAVE_PTHREAD_CONDATTR_INIT 1
#define HAVE_EXPLICIT_BZERO 1
#define HAVE_MEMRCHR 1
#define HAVE_FMEMOPEN 1
#define HAVE_CLOSEFROM 1
#define HAVE_QSORT_R
#define HAVE_QSORT_R_GNU
#define HAVE_DLADDR
#define HAVE_BACKTRACE 1
#define HAVE_SIGWAITINFO 1
#define HAVE_GETTID
#define HAVE_IPSEC_MODE_BEET
#define HAVE_IPSEC_DIR_FWD

/* Debian's libstrongswan uses glibc's register_printf_specifier() hooks,
 * not the builtin printf (USE_BUILTIN_PRINTF) or Vstr (USE_VSTR) */
#define HAVE_PRINTF_SPECIFIER

/* Debian uses --with-capabilities=libcap; the CAP_* numbers are the same
 * when taken from the kernel header, which needs no libcap-dev */
#define CAPABILITIES_NATIVE

#endif /* PROTEGO_STRONGSWAN_CONFIG_H */
