"""GIN/GEN ruleset: desired tables, read-back parsing of recorded nft JSON, diff (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from protego.lb import model, ruleset
from protego.lb.model import tunnel_id
from protego.lb.policy import mark_of

P = model.PREFIX


def entries(**over: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        P + "gpn/nodes/gpn1": {"node": "gpn1", "fabric_addr": "192.0.2.21"},
        P + "gmn/leader": {"node": "gmn1", "fabric_addr": "192.0.2.11"},
        P + "steer/in/203.0.113.11/00001234": {"gpn": "gpn1", "tenant": "acme", "tunnel": "hq"},
        P + "steer/out/acme/hq": {"gpn": "gpn1", "vni": 1001, "local_ts": ["10.1.0.0/24"],
                                  "remote_ts": ["10.201.0.0/24", "10.9.9.9"], "rate_mbps": 8},
    }
    e.update({P + k: v for k, v in over.items()})
    return e


SLOTS = {"192.0.2.11": 1, "192.0.2.21": 2}
PARAMS = ruleset.Params(vip_prefixes=("203.0.113.0/24", "198.51.100.0/25"))


def tables(e: dict[str, Any], slots: dict[str, int] = SLOTS) -> dict[str, ruleset.Table]:
    st = model.build_state(e)
    assert st.errors == ()
    return {t.name: t for t in ruleset.desired_tables(st, slots, {"gin", "gen"}, PARAMS)}


installed_of = ruleset.as_installed


# a recording of `nft -j list table ip protego_gin|protego_gen` (nft 1.0.6, kernel 6.18) after
# loading tables(entries()) with SLOTS and PARAMS
RECORDED: dict[str, Any] = json.loads(
    '{"protego_gin":{"nftables":[{"metainfo":{"version":"1.0.6","release_name":"Lester Gooch '
    '#5","json_schema_version":1}},{"table":{"family":"ip","name":"protego_gin","handle":1}},'
    '{"counter":{"family":"ip","name":"ct_invalid","table":"protego_gin","handle":1,"packets"'
    ':0,"bytes":0}},{"counter":{"family":"ip","name":"esp_unknown_spi","table":"protego_gin",'
    '"handle":2,"packets":0,"bytes":0}},{"counter":{"family":"ip","name":"ike_no_gmn","table"'
    ':"protego_gin","handle":3,"packets":0,"bytes":0}},{"counter":{"family":"ip","name":"ike_'
    'to_gmn","table":"protego_gin","handle":4,"packets":0,"bytes":0}},{"counter":{"family":"i'
    'p","name":"nat_keepalive","table":"protego_gin","handle":5,"packets":0,"bytes":0}},{"cou'
    'nter":{"family":"ip","name":"tag_88d351b2","table":"protego_gin","handle":6,"packets":0,'
    '"bytes":0}},{"counter":{"family":"ip","name":"udp_unknown_spi","table":"protego_gin","ha'
    'ndle":7,"packets":0,"bytes":0}},{"limit":{"family":"ip","name":"lin_a8c995730f_1000000",'
    '"table":"protego_gin","handle":8,"rate":1000000,"per":"second","inv":true,"rate_unit":"b'
    'ytes"}},{"map":{"family":"ip","name":"spi_in","table":"protego_gin","type":["ipv4_addr",'
    '"integer"],"handle":9,"map":"verdict","elem":[[{"concat":["203.0.113.11",4660]},{"jump":'
    '{"target":"in_a8c995730f_2"}}]]}},{"chain":{"family":"ip","table":"protego_gin","name":"'
    'in_a8c995730f_2","handle":10}},{"chain":{"family":"ip","table":"protego_gin","name":"c_i'
    'ke","handle":11}},{"chain":{"family":"ip","table":"protego_gin","name":"c_esp","handle":'
    '12}},{"chain":{"family":"ip","table":"protego_gin","name":"c_natt","handle":13}},{"chain'
    '":{"family":"ip","table":"protego_gin","name":"prerouting","handle":14,"type":"filter","'
    'hook":"prerouting","prio":-300,"policy":"accept"}},{"rule":{"family":"ip","table":"prote'
    'go_gin","chain":"in_a8c995730f_2","handle":15,"comment":"pg:59075b8f8f:0","expr":[{"limi'
    't":"lin_a8c995730f_1000000"},{"counter":{"packets":0,"bytes":0}},{"drop":null}]}},{"rule'
    '":{"family":"ip","table":"protego_gin","chain":"in_a8c995730f_2","handle":16,"comment":"'
    'pg:59075b8f8f:1","expr":[{"match":{"op":"==","left":{"numgen":{"mode":"random","mod":100'
    '0,"offset":0}},"right":0}},{"mangle":{"key":{"payload":{"protocol":"ip","field":"dscp"}}'
    ',"value":55}},{"counter":"tag_88d351b2"}]}},{"rule":{"family":"ip","table":"protego_gin"'
    ',"chain":"in_a8c995730f_2","handle":17,"comment":"pg:59075b8f8f:2","expr":[{"mangle":{"k'
    'ey":{"meta":{"key":"mark"}},"value":1346830338}},{"counter":{"packets":0,"bytes":0}},{"a'
    'ccept":null}]}},{"rule":{"family":"ip","table":"protego_gin","chain":"c_ike","handle":18'
    ',"comment":"pg:4e13fc6f22:0","expr":[{"mangle":{"key":{"meta":{"key":"mark"}},"value":13'
    '46830337}},{"counter":"ike_to_gmn"},{"accept":null}]}},{"rule":{"family":"ip","table":"p'
    'rotego_gin","chain":"c_esp","handle":19,"comment":"pg:2fcd32492c:0","expr":[{"notrack":n'
    'ull}]}},{"rule":{"family":"ip","table":"protego_gin","chain":"c_esp","handle":20,"commen'
    't":"pg:2fcd32492c:1","expr":[{"vmap":{"key":{"concat":[{"payload":{"protocol":"ip","fiel'
    'd":"daddr"}},{"payload":{"protocol":"esp","field":"spi"}}]},"data":"@spi_in"}}]}},{"rule'
    '":{"family":"ip","table":"protego_gin","chain":"c_esp","handle":21,"comment":"pg:2fcd324'
    '92c:2","expr":[{"counter":"esp_unknown_spi"},{"drop":null}]}},{"rule":{"family":"ip","ta'
    'ble":"protego_gin","chain":"c_natt","handle":22,"comment":"pg:a9186db0bf:0","expr":[{"ma'
    'tch":{"op":"==","left":{"payload":{"protocol":"udp","field":"length"}},"right":9}},{"mat'
    'ch":{"op":"==","left":{"payload":{"base":"th","offset":64,"len":8}},"right":255}},{"coun'
    'ter":"nat_keepalive"},{"drop":null}]}},{"rule":{"family":"ip","table":"protego_gin","cha'
    'in":"c_natt","handle":23,"comment":"pg:a9186db0bf:1","expr":[{"match":{"op":"==","left":'
    '{"payload":{"base":"th","offset":64,"len":32}},"right":0}},{"jump":{"target":"c_ike"}}]}'
    '},{"rule":{"family":"ip","table":"protego_gin","chain":"c_natt","handle":24,"comment":"p'
    'g:a9186db0bf:2","expr":[{"vmap":{"key":{"concat":[{"payload":{"protocol":"ip","field":"d'
    'addr"}},{"payload":{"base":"th","offset":64,"len":32}}]},"data":"@spi_in"}}]}},{"rule":{'
    '"family":"ip","table":"protego_gin","chain":"c_natt","handle":25,"comment":"pg:a9186db0b'
    'f:3","expr":[{"counter":"udp_unknown_spi"},{"drop":null}]}},{"rule":{"family":"ip","tabl'
    'e":"protego_gin","chain":"prerouting","handle":27,"comment":"pg:723ae55162:0","expr":[{"'
    'match":{"op":"!=","left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"set":[{'
    '"prefix":{"addr":"198.51.100.0","len":25}},{"prefix":{"addr":"203.0.113.0","len":24}}]}}'
    '},{"return":null}]}},{"rule":{"family":"ip","table":"protego_gin","chain":"prerouting","'
    'handle":28,"comment":"pg:723ae55162:1","expr":[{"match":{"op":"==","left":{"payload":{"p'
    'rotocol":"ip","field":"dscp"}},"right":55}},{"mangle":{"key":{"payload":{"protocol":"ip"'
    ',"field":"dscp"}},"value":"cs0"}}]}},{"rule":{"family":"ip","table":"protego_gin","chain'
    '":"prerouting","handle":29,"comment":"pg:723ae55162:2","expr":[{"match":{"op":"==","left'
    '":{"payload":{"protocol":"ip","field":"protocol"}},"right":"esp"}},{"jump":{"target":"c_'
    'esp"}}]}},{"rule":{"family":"ip","table":"protego_gin","chain":"prerouting","handle":30,'
    '"comment":"pg:723ae55162:3","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"u'
    'dp","field":"dport"}},"right":500}},{"notrack":null},{"jump":{"target":"c_ike"}}]}},{"ru'
    'le":{"family":"ip","table":"protego_gin","chain":"prerouting","handle":31,"comment":"pg:'
    '723ae55162:4","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"udp","field":"d'
    'port"}},"right":4500}},{"notrack":null},{"jump":{"target":"c_natt"}}]}},{"rule":{"family'
    '":"ip","table":"protego_gin","chain":"prerouting","handle":32,"comment":"pg:723ae55162:5'
    '","expr":[{"match":{"op":"in","left":{"ct":{"key":"state"}},"right":"invalid"}},{"counte'
    'r":"ct_invalid"}]}}]},"protego_gen":{"nftables":[{"metainfo":{"version":"1.0.6","release'
    '_name":"Lester Gooch #5","json_schema_version":1}},{"table":{"family":"ip","name":"prote'
    'go_gen","handle":2}},{"counter":{"family":"ip","name":"tag_88d351b2","table":"protego_ge'
    'n","handle":1,"packets":0,"bytes":0}},{"counter":{"family":"ip","name":"vxlan_no_tunnel"'
    ',"table":"protego_gen","handle":2,"packets":0,"bytes":0}},{"limit":{"family":"ip","name"'
    ':"lout_a8c995730f_1000000","table":"protego_gen","handle":3,"rate":1000000,"per":"second'
    '","inv":true,"rate_unit":"bytes"}},{"map":{"family":"ip","name":"tun_out","table":"prote'
    'go_gen","type":["integer","integer","integer"],"handle":4,"map":"verdict","flags":["inte'
    'rval"],"elem":[[{"concat":[256256,168364297,{"range":[167837696,167837951]}]},{"jump":{"'
    'target":"out_a8c995730f"}}],[{"concat":[256256,{"range":[180944896,180945151]},{"range":'
    '[167837696,167837951]}]},{"jump":{"target":"out_a8c995730f"}}]]}},{"chain":{"family":"ip'
    '","table":"protego_gen","name":"out_a8c995730f","handle":5}},{"chain":{"family":"ip","ta'
    'ble":"protego_gen","name":"c_vxlan","handle":6}},{"chain":{"family":"ip","table":"proteg'
    'o_gen","name":"prerouting","handle":7,"type":"filter","hook":"prerouting","prio":-300,"p'
    'olicy":"accept"}},{"chain":{"family":"ip","table":"protego_gen","name":"output","handle"'
    ':8,"type":"filter","hook":"output","prio":0,"policy":"accept"}},{"rule":{"family":"ip","'
    'table":"protego_gen","chain":"out_a8c995730f","handle":9,"comment":"pg:abe9774a5c:0","ex'
    'pr":[{"limit":"lout_a8c995730f_1000000"},{"counter":{"packets":0,"bytes":0}},{"drop":nul'
    'l}]}},{"rule":{"family":"ip","table":"protego_gen","chain":"out_a8c995730f","handle":10,'
    '"comment":"pg:abe9774a5c:1","expr":[{"match":{"op":"==","left":{"numgen":{"mode":"random'
    '","mod":1000,"offset":0}},"right":0}},{"mangle":{"key":{"payload":{"protocol":"ip","fiel'
    'd":"dscp"}},"value":55}},{"counter":"tag_88d351b2"}]}},{"rule":{"family":"ip","table":"p'
    'rotego_gen","chain":"out_a8c995730f","handle":11,"comment":"pg:abe9774a5c:2","expr":[{"m'
    'angle":{"key":{"payload":{"protocol":"ip","field":"daddr"}},"value":"192.0.2.21"}},{"cou'
    'nter":{"packets":0,"bytes":0}},{"accept":null}]}},{"rule":{"family":"ip","table":"proteg'
    'o_gen","chain":"c_vxlan","handle":12,"comment":"pg:75b17480d6:0","expr":[{"notrack":null'
    '}]}},{"rule":{"family":"ip","table":"protego_gen","chain":"c_vxlan","handle":13,"comment'
    '":"pg:75b17480d6:1","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ip","fiel'
    'd":"dscp"}},"right":55}},{"mangle":{"key":{"payload":{"protocol":"ip","field":"dscp"}},"'
    'value":"cs0"}}]}},{"rule":{"family":"ip","table":"protego_gen","chain":"c_vxlan","handle'
    '":14,"comment":"pg:75b17480d6:2","expr":[{"vmap":{"key":{"concat":[{"payload":{"base":"t'
    'h","offset":96,"len":32}},{"payload":{"base":"th","offset":368,"len":32}},{"payload":{"b'
    'ase":"th","offset":336,"len":32}}]},"data":"@tun_out"}}]}},{"rule":{"family":"ip","table'
    '":"protego_gen","chain":"c_vxlan","handle":15,"comment":"pg:75b17480d6:3","expr":[{"coun'
    'ter":"vxlan_no_tunnel"},{"drop":null}]}},{"rule":{"family":"ip","table":"protego_gen","c'
    'hain":"prerouting","handle":16,"comment":"pg:15ccf70c2c:0","expr":[{"match":{"op":"==","'
    'left":{"payload":{"protocol":"udp","field":"dport"}},"right":4789}},{"match":{"op":"==",'
    '"left":{"payload":{"base":"th","offset":64,"len":8}},"right":8}},{"match":{"op":"==","le'
    'ft":{"payload":{"base":"th","offset":224,"len":16}},"right":2048}},{"match":{"op":"==","'
    'left":{"fib":{"result":"type","flags":["daddr"]}},"right":"local"}},{"jump":{"target":"c'
    '_vxlan"}}]}},{"rule":{"family":"ip","table":"protego_gen","chain":"output","handle":17,"'
    'comment":"pg:aafc276cd0:0","expr":[{"match":{"op":"==","left":{"payload":{"protocol":"ic'
    'mp","field":"type"}},"right":"redirect"}},{"drop":null}]}}]}}'
)


def test_recorded_readback_matches_desired_exactly() -> None:
    for name, t in tables(entries()).items():
        inst = ruleset.parse_installed(RECORDED[name], name)
        assert inst is not None
        assert ruleset.diff(t, inst) == []
        assert ruleset.owned(inst)


def test_parse_installed_absent_table() -> None:
    assert ruleset.parse_installed({"nftables": [{"metainfo": {}}]}, "protego_gin") is None


def test_gin_table_content() -> None:
    t = tables(entries())["protego_gin"]
    tid = tunnel_id("acme", "hq")
    chain = t.chains[f"in_{tid}_2"]
    assert chain.rules[0] == f'limit name "lin_{tid}_1000000" counter drop'
    assert chain.rules[1].startswith("numgen random mod 1000 0 ip dscp set 0x37")
    assert chain.rules[2] == f"meta mark set {mark_of(2):#010x} counter accept"
    assert t.maps["spi_in"].elements == {"203.0.113.11 . 0x00001234": f"jump in_{tid}_2"}
    assert t.limits == {f"lin_{tid}_1000000": 1_000_000}
    assert f"meta mark set {mark_of(1):#010x}" in t.chains["c_ike"].rules[0]
    pre = t.chains["prerouting"]
    assert pre.hook == "prerouting" and pre.prio == -300
    assert any("notrack jump c_ike" in r for r in pre.rules)
    assert any(r.startswith("ct state") for r in pre.rules)  # turns on reassembly
    natt = t.chains["c_natt"].rules
    assert natt[0].startswith("udp length 9 @th,64,8 0xff") and "drop" in natt[0]
    assert natt[1] == "@th,64,32 0 jump c_ike"


def test_no_gmn_drops_ike_and_counts() -> None:
    e = entries()
    del e[P + "gmn/leader"]
    st = model.build_state(e)
    t = ruleset.gin_table(st, {"192.0.2.21": 2}, PARAMS)
    assert t.chains["c_ike"].rules == ('counter name "ike_no_gmn" drop',)
    assert ruleset.wanted_next_hops(st, {"gin"}) == {"192.0.2.21"}


def test_every_registered_gpn_has_a_next_hop_before_its_first_tunnel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recovery onto a GPN that carries nothing yet must not wait for its policy route:
    registered GPNs get one in advance, as long as spare slots last (GPNs owning inbound
    SPIs and the GMN always do)."""
    e = entries(**{"gpn/nodes/gpn2": {"node": "gpn2", "fabric_addr": "192.0.2.22"},
                   "gpn/nodes/gpn3": {"node": "gpn3", "fabric_addr": "192.0.2.23"}})
    st = model.build_state(e)
    assert ruleset.wanted_next_hops(st, {"gin"}) == {"192.0.2.11", "192.0.2.21", "192.0.2.22", "192.0.2.23"}
    assert ruleset.wanted_next_hops(st, {"gen"}) == set()  # the GEN marks nothing
    monkeypatch.setattr(ruleset, "SPARE_HOP_SLOTS", 3)
    # 2 hops needed (gpn1 owns an SPI, the GMN): one spare slot left, the lowest address
    assert ruleset.wanted_next_hops(st, {"gin"}) == {"192.0.2.11", "192.0.2.21", "192.0.2.22"}
    monkeypatch.setattr(ruleset, "SPARE_HOP_SLOTS", 1)
    assert ruleset.wanted_next_hops(st, {"gin"}) == {"192.0.2.11", "192.0.2.21"}


def test_gen_table_content_and_keys() -> None:
    t = tables(entries())["protego_gen"]
    tid = tunnel_id("acme", "hq")
    assert t.chains[f"out_{tid}"].rules[-1] == "ip daddr set 192.0.2.21 counter accept"
    assert t.maps["tun_out"].elements == {
        "0x0003e900 . 0x0ac90000-0x0ac900ff . 0x0a010000-0x0a0100ff": f"jump out_{tid}",
        "0x0003e900 . 0x0a090909 . 0x0a010000-0x0a0100ff": f"jump out_{tid}",
    }
    assert "@th,96,32 . @th,368,32 . @th,336,32 vmap @tun_out" in t.chains["c_vxlan"].rules


def test_unlimited_tunnel_has_no_limit_and_sampling_off() -> None:
    e = entries(**{"steer/out/acme/hq": {"gpn": "gpn1", "vni": 1001, "local_ts": ["10.1.0.0/24"],
                                         "remote_ts": ["10.201.0.0/24"], "rate_mbps": 0}})
    st = model.build_state(e)
    t = ruleset.gin_table(st, SLOTS, ruleset.Params(sample=0))
    chain = t.chains[f"in_{tunnel_id('acme', 'hq')}_2"]
    assert chain.rules == (f"meta mark set {mark_of(2):#010x} counter accept",)
    assert t.limits == {}


def test_diff_spi_move_is_delete_plus_add_of_one_element() -> None:
    e = entries(**{"gpn/nodes/gpn2": {"fabric_addr": "192.0.2.22"}})
    slots = {**SLOTS, "192.0.2.22": 3}
    before = tables(e, slots)["protego_gin"]
    e[P + "steer/in/203.0.113.11/00001234"] = {"gpn": "gpn2", "tenant": "acme", "tunnel": "hq"}
    after = tables(e, slots)["protego_gin"]
    cmds = ruleset.diff(after, installed_of(before))
    tid = tunnel_id("acme", "hq")
    assert cmds is not None
    add_chain = cmds.index(f"add chain ip protego_gin in_{tid}_3")
    delete = cmds.index("delete element ip protego_gin spi_in { 203.0.113.11 . 0x00001234 }")
    add = cmds.index(f"add element ip protego_gin spi_in {{ 203.0.113.11 . 0x00001234 : jump in_{tid}_3 }}")
    drop_old = cmds.index(f"delete chain ip protego_gin in_{tid}_2")
    assert add_chain < delete < add < drop_old
    assert not any("prerouting" in c for c in cmds)  # nothing else touched


def test_diff_rate_change_replaces_limit_object_by_name() -> None:
    before = tables(entries())
    e = entries()
    e[P + "steer/out/acme/hq"] = dict(e[P + "steer/out/acme/hq"], rate_mbps=16)
    after = tables(e)
    tid = tunnel_id("acme", "hq")
    for name, kind in (("protego_gin", "lin"), ("protego_gen", "lout")):
        cmds = ruleset.diff(after[name], installed_of(before[name]))
        assert cmds is not None
        assert cmds[0] == f"add limit ip {name} {kind}_{tid}_2000000 {{ rate over 2000000 bytes/second ; }}"
        assert cmds[-1] == f"delete limit ip {name} {kind}_{tid}_1000000"
        flush = [c for c in cmds if c.startswith("flush chain")]
        assert len(flush) == 1  # only the tunnel's own chain is rewritten


def test_diff_repairs_a_tampered_chain_and_missing_element() -> None:
    t = tables(entries())["protego_gin"]
    inst = installed_of(t)
    inst.chains["prerouting"] = (inst.chains["prerouting"][0], ())  # flushed by someone
    del inst.maps["spi_in"][1]["203.0.113.11 . 0x00001234"]
    inst.limits.add("lin_stale_1")
    cmds = ruleset.diff(t, inst)
    assert cmds is not None
    assert "flush chain ip protego_gin prerouting" in cmds
    assert sum(c.startswith("add rule ip protego_gin prerouting") for c in cmds) == 6
    assert any(c.startswith("add element ip protego_gin spi_in") for c in cmds)
    assert cmds[-1] == "delete limit ip protego_gin lin_stale_1"


def test_diff_changed_map_type_asks_for_rebuild() -> None:
    t = tables(entries())["protego_gin"]
    inst = installed_of(t)
    inst.maps["spi_in"] = (("ipv4_addr", "verdict"), {})
    assert ruleset.diff(t, inst) is None
    cmds = ruleset.rebuild(t)
    assert cmds[:2] == ["add table ip protego_gin", "delete table ip protego_gin"]


def test_create_orders_declarations_before_use() -> None:
    cmds = ruleset.diff(tables(entries())["protego_gin"], None)
    assert cmds is not None
    first_rule = next(i for i, c in enumerate(cmds) if c.startswith("add rule"))
    assert all(not c.startswith(("add counter", "add limit", "add map", "add chain")) for c in cmds[first_rule:])
    elements = next(i for i, c in enumerate(cmds) if c.startswith("add element"))
    base_rule = next(i for i, c in enumerate(cmds) if c.startswith("add rule ip protego_gin prerouting"))
    assert elements < base_rule  # the entry point goes live last


def test_every_rule_is_tagged_and_elements_are_chunked() -> None:
    e = entries()
    for i in range(1200):
        e[P + f"steer/in/203.0.113.11/{0x10000 + i:08x}"] = {"gpn": "gpn1", "tenant": "acme", "tunnel": "hq"}
    t = tables(e)["protego_gin"]
    cmds = ruleset.diff(t, None)
    assert cmds is not None
    for c in cmds:
        if c.startswith("add rule"):
            assert ' comment "pg:' in c
    assert sum(c.startswith("add element ip protego_gin spi_in") for c in cmds) == 3


def test_element_key_parsing() -> None:
    assert ruleset.element_key({"concat": ["203.0.113.11", 4660]}) == "203.0.113.11 . 0x00001234"
    assert ruleset.element_key({"concat": [256256, {"range": [1, 2]}, 5]}) == "0x0003e900 . 0x00000001-0x00000002 . 0x00000005"
    assert ruleset.element_key({"prefix": {"addr": "10.0.0.0", "len": 8}}) == "0x0a000000-0x0affffff"
    assert ruleset.element_value({"jump": {"target": "x"}}) == "jump x"
    with pytest.raises(TypeError):
        ruleset.element_key(True)


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        ruleset.Params(tag_dscp=0)
    with pytest.raises(ValueError):
        ruleset.Params(sample=-1)


def test_rendered_json_round_trip_of_recording() -> None:
    # the recording is valid JSON nft itself produced; re-serialising keeps it parseable
    doc = json.loads(json.dumps(RECORDED["protego_gen"]))
    inst = ruleset.parse_installed(doc, "protego_gen")
    assert inst is not None and "tun_out" in inst.maps and inst.chains["output"][0] == ("output", 0)


def test_only_vips_are_steered() -> None:
    st = model.build_state(entries(**{
        "steer/in/198.51.100.200/00001235": {"gpn": "gpn1", "tenant": "acme", "tunnel": "hq"},
        "steer/in/203.0.114.0/00001236": {"gpn": "gpn1", "tenant": "acme", "tunnel": "hq"}}))
    p = ruleset.Params(vip_prefixes=("203.0.113.0/24", "203.0.113.128/25", "198.51.100.0/25"))
    rules = ruleset.gin_table(st, SLOTS, p).chains["prerouting"].rules
    # merged: 203.0.113.0/24 + the adjacent 203.0.114.0; 198.51.100.200 outside its /25
    assert rules[0] == ("ip daddr != { 198.51.100.0-198.51.100.127, 198.51.100.200, "
                        "203.0.113.0-203.0.114.0 } return")
    empty = model.build_state({P + "gpn/nodes/gpn1": {"fabric_addr": "192.0.2.21"}})
    assert ruleset.gin_table(empty, {}, ruleset.Params()).chains["prerouting"].rules[0] == "return"
    with pytest.raises(ValueError, match="not an IPv4 prefix"):
        ruleset.Params(vip_prefixes=("203.0.113.1/24",))
