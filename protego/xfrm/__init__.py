"""Protego's own XFRM netlink encoder/decoder and socket layer (the ``xfrm`` backend).

* :mod:`.messages` -- pure encoding/decoding of XFRM states and policies
* :mod:`.convert` -- ``protego.esp`` SA model -> XFRM state
* :mod:`.netlink` -- the NETLINK_XFRM socket (ACKs, dumps, errno-carrying errors)
* :mod:`.probe` -- start-up check whether the kernel can do ESP
"""

from .convert import algorithms_for, state_from_sa
from .messages import (
    Algorithm,
    Encap,
    LifetimeCfg,
    Mark,
    Selector,
    XfrmPolicy,
    XfrmState,
    XfrmTemplate,
    decode_policy,
    decode_state,
    encode_policy,
    encode_policy_delete,
    encode_policy_dump,
    encode_state,
    encode_state_delete,
    encode_state_dump,
    encode_state_get,
)
from .netlink import XfrmError, XfrmSocket, open_xfrm_socket
from .probe import EspProbeResult, probe_kernel_esp

__all__ = [
    "Algorithm",
    "Encap",
    "EspProbeResult",
    "LifetimeCfg",
    "Mark",
    "Selector",
    "XfrmError",
    "XfrmPolicy",
    "XfrmSocket",
    "XfrmState",
    "XfrmTemplate",
    "algorithms_for",
    "decode_policy",
    "decode_state",
    "encode_policy",
    "encode_policy_delete",
    "encode_policy_dump",
    "encode_state",
    "encode_state_delete",
    "encode_state_dump",
    "encode_state_get",
    "open_xfrm_socket",
    "probe_kernel_esp",
    "state_from_sa",
]
