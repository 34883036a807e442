"""Protego: a multitenant, distributed IPsec VPN gateway service."""

__version__ = "0.1.0"
