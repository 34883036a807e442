"""Pieces of strongswan.conf every charon Protego starts shares (pure text)."""

from __future__ import annotations

from pathlib import Path


def charon_logging(log_path: Path, indent: str = "    ") -> str:
    """charon logs to one file (level 1: never keys), not to syslog."""
    body = f"""syslog {{
    daemon {{
        default = -1
    }}
}}
filelog {{
    charon {{
        path = {log_path}
        time_format = %b %e %T
        time_add_ms = yes
        ike_name = yes
        append = yes
        default = 1
        flush_line = yes
    }}
}}"""
    return "\n".join(indent + line for line in body.splitlines())


def swanctl_section(vici_uri: str) -> str:
    return f"swanctl {{\n    socket = {vici_uri}\n}}\n"
