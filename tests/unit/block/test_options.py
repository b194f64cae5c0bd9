"""`--blockdev` parsing, cache modes, and the errors bad options give."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.block import CacheMode, cache_settings, open_backend, parse_cache_mode
from harness.block.options import flatten, parse_dotted, parse_size
from harness.block.throttle import ThrottleLimits
from harness.errors import ConfigError


def test_dotted_and_nested_forms_give_the_same_options() -> None:
    dotted = parse_dotted("driver=raw,file.driver=file,file.filename=d.img")
    nested = flatten({"driver": "raw", "file": {"driver": "file", "filename": "d.img"}})
    assert dotted == nested == {"driver": "raw", "file.driver": "file", "file.filename": "d.img"}


def test_double_comma_escapes_a_comma_in_a_value() -> None:
    assert parse_dotted("driver=file,filename=a,,b.img") == {
        "driver": "file",
        "filename": "a,b.img",
    }


_keys = st.from_regex(r"[a-z][a-z0-9-]{0,8}(\.[a-z][a-z0-9-]{0,8}){0,2}", fullmatch=True)
_values = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)


@given(st.dictionaries(_keys, _values, min_size=1, max_size=6))
def test_dotted_form_round_trips_any_keys_and_values(options: dict[str, str]) -> None:
    spec = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in options.items())
    assert parse_dotted(spec) == options


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("4k", 4096),
        ("4K", 4096),
        ("1M", 1 << 20),
        ("2G", 2 << 30),
        ("0x1000", 4096),
        ("1.5k", 1536),
        ("512b", 512),
    ],
)
def test_sizes_take_binary_suffixes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["2x", "k", "-1", "1.3k", ""])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


@pytest.mark.parametrize(
    ("mode", "write_cache", "direct", "no_flush"),
    [
        ("writeback", True, False, False),
        ("none", True, True, False),
        ("off", True, True, False),
        ("writethrough", False, False, False),
        ("directsync", False, True, False),
        ("unsafe", True, False, True),
    ],
)
def test_cache_modes_map_as_bdrv_parse_cache_mode(
    mode: str, write_cache: bool, direct: bool, no_flush: bool
) -> None:
    s = cache_settings(parse_cache_mode(mode))
    assert (s.write_cache, s.direct, s.no_flush) == (write_cache, direct, no_flush)


def test_off_is_an_alias_of_none() -> None:
    assert parse_cache_mode("off") is CacheMode.NONE


@pytest.mark.parametrize("mode", ["direct", "WriteBack", "", "none "])
def test_unknown_cache_mode_lists_the_valid_ones(mode: str) -> None:
    with pytest.raises(ConfigError, match=r"valid modes: writeback, none .*directsync, unsafe"):
        parse_cache_mode(mode)


def test_unknown_driver_lists_the_valid_drivers(image: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown block driver 'qcow3'.*file.*null.*raw"):
        open_backend({"driver": "qcow3", "file": str(image)})


def test_unknown_option_is_named_and_the_valid_ones_listed(image: Path) -> None:
    with pytest.raises(ConfigError, match=r"has no option 'filname'; valid options: .*filename"):
        open_backend(f"driver=raw,file.driver=file,file.filname={image}")


def test_missing_driver_is_reported(image: Path) -> None:
    with pytest.raises(ConfigError, match="no 'driver' option"):
        open_backend({"file": {"driver": "file", "filename": str(image)}})


def test_format_without_a_child_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a 'file' child"):
        open_backend("driver=raw")


def test_bad_option_values_are_refused(image: Path) -> None:
    with pytest.raises(ConfigError, match="not a boolean"):
        open_backend(f"driver=raw,file.driver=file,file.filename={image},cache.direct=maybe")
    with pytest.raises(ConfigError, match="not a size"):
        open_backend(f"driver=raw,offset=lots,file.driver=file,file.filename={image}")
    with pytest.raises(ConfigError, match="invalid error policy 'explode'"):
        open_backend(f"driver=raw,werror=explode,file.driver=file,file.filename={image}")


def test_missing_image_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"No such file.*truncate"):
        open_backend(str(tmp_path / "absent.img"))


def test_duplicate_node_names_are_refused(image: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate node-name 'a'"):
        open_backend(
            f"driver=raw,node-name=a,file.driver=file,file.node-name=a,file.filename={image}"
        )


def test_node_names_find_nodes(image: Path) -> None:
    with open_backend(
        f"driver=raw,node-name=fmt,file.driver=file,file.node-name=proto,file.filename={image}"
    ) as backend:
        assert backend.node("proto").driver == "file"
        assert backend.node("fmt") is backend.root
        with pytest.raises(ConfigError, match="nodes: fmt, proto"):
            backend.node("nope")


def test_children_inherit_cache_options(image: Path) -> None:
    with open_backend(str(image), cache="directsync") as backend:
        assert all(n.open_flags.direct for n in backend.graph.nodes.values())


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"throttling.iops-total": "100", "throttling.iops-read": "10"}, "at the same time"),
        ({"throttling.bps-total-max": "1M"}, "needs throttling.bps-total"),
        ({"throttling.iops-total": "100", "throttling.iops-total-max": "50"}, "cannot be lower"),
        (
            {"throttling.iops-total": "100", "throttling.iops-total-max-length": "5"},
            "needs throttling.iops-total-max",
        ),
        ({"throttling.iops-total": "-1"}, "between 0 and"),
        ({"throttling.iops-everything": "1"}, "valid options: .*throttling.iops-total"),
    ],
)
def test_invalid_throttle_limits_are_refused(limits: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ThrottleLimits.parse(limits)


def test_blockdevs_refer_to_earlier_nodes_as_qemu_storage_daemon_does(image: Path) -> None:
    from harness.block import open_blockdevs

    blockdevs = [
        f"driver=file,node-name=file0,filename={image}",
        "driver=raw,node-name=disk0,file=file0,offset=4k",
    ]
    with open_blockdevs(blockdevs, "disk0", device={"werror": "report"}) as backend:
        assert backend.root.node_name == "disk0"
        assert backend.node("file0").driver == "file"
        assert backend.werror.value == "report"
        backend.write(0, b"qsd")
    assert image.read_bytes()[4096:4099] == b"qsd"


def test_blockdevs_name_what_is_wrong(image: Path) -> None:
    from harness.block import open_blockdevs

    base = f"driver=file,node-name=file0,filename={image}"
    with pytest.raises(ConfigError, match="needs a node-name"):
        open_blockdevs([f"driver=file,filename={image}"], "x")
    with pytest.raises(ConfigError, match="'disk9' is not defined; top-level nodes: file0"):
        open_blockdevs([base], "disk9")
    with pytest.raises(ConfigError, match="'file0' is the child of another node"):
        open_blockdevs([base, "driver=raw,node-name=d0,file=file0"], "file0")
    with pytest.raises(ConfigError, match="unknown device option 'cache'"):
        open_blockdevs([base], "file0", device={"cache": "none"})
