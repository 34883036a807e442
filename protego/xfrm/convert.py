"""Translate Protego's ESP SA model into XFRM states and policies (pure)."""

from __future__ import annotations

from protego.esp.sa import SecurityAssociation

from .constants import (
    XFRM_INF,
    XFRM_STATE_ESN,
    XFRMA_ALG_AEAD,
    XFRMA_ALG_AUTH_TRUNC,
    XFRMA_ALG_CRYPT,
)
from .messages import Algorithm, Encap, LifetimeCfg, Mark, Selector, XfrmState

__all__ = ["algorithms_for", "state_from_sa"]


def algorithms_for(sa: SecurityAssociation) -> tuple[Algorithm, ...]:
    """XFRM algorithm attributes for the SA's suite (keys inside, hidden in repr)."""
    spec = sa.suite.spec
    keys = sa.keys
    if spec.aead:
        return (Algorithm(XFRMA_ALG_AEAD, spec.xfrm_enc_name, keys.enc_key + keys.salt,
                          spec.xfrm_trunc_bits),)
    assert spec.xfrm_auth_name is not None
    return (
        Algorithm(XFRMA_ALG_CRYPT, spec.xfrm_enc_name, keys.enc_key),
        Algorithm(XFRMA_ALG_AUTH_TRUNC, spec.xfrm_auth_name, keys.auth_key,
                  spec.xfrm_trunc_bits),
    )


def _limit(value: int | None) -> int:
    return XFRM_INF if value is None else value


def state_from_sa(sa: SecurityAssociation, mark: Mark | None = None,
                  if_id: int | None = None,
                  selector: Selector | None = None) -> XfrmState:
    """The XFRM state that realises ``sa`` in the kernel."""
    lt = sa.lifetime
    lifetime = LifetimeCfg(
        soft_byte_limit=_limit(lt.soft_bytes), hard_byte_limit=_limit(lt.hard_bytes),
        soft_packet_limit=_limit(lt.soft_packets), hard_packet_limit=_limit(lt.hard_packets),
        soft_add_expires_seconds=lt.soft_seconds or 0,
        hard_add_expires_seconds=lt.hard_seconds or 0,
    )
    encap = Encap(sa.encap.sport, sa.encap.dport) if sa.encap is not None else None
    return XfrmState(
        src=sa.src, dst=sa.dst, spi=sa.spi, reqid=sa.reqid,
        replay_window=sa.replay_window, flags=XFRM_STATE_ESN if sa.esn else 0,
        selector=selector or Selector(), lifetime=lifetime,
        algorithms=algorithms_for(sa), encap=encap, mark=mark, if_id=if_id,
    )
