"""nbdkit Python plugin serving a powercut BlockBackend (for the NBD server comparison only).

    nbdkit --unix S --foreground python benchmarks/_nbdkit_plugin.py \
        image=disk.img [cache=writeback] [root=/path/to/powercut]

Runs inside nbdkit's embedded CPython (Debian's python3.11, the same interpreter the
venv is built on), so `root` must point at the checkout for `harness` to import.
"""

import sys

import nbdkit  # type: ignore[import-not-found]

API_VERSION = 2

_config = {"cache": "writeback"}
_backend = None


def config(key, value):
    _config[key] = value


def config_complete():
    global _backend
    if "root" in _config:
        sys.path.insert(0, _config["root"])
    from harness.block import open_backend

    _backend = open_backend(_config["image"], cache=_config["cache"])


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return _backend.length


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    _backend.readv(offset, [memoryview(buf)])


def pwrite(h, buf, offset, flags):
    _backend.writev(offset, [memoryview(buf)], fua=bool(flags & nbdkit.FLAG_FUA))


def flush(h, flags):
    _backend.flush()


def trim(h, count, offset, flags):
    _backend.discard(offset, count)
    if flags & nbdkit.FLAG_FUA:
        _backend.flush()


def zero(h, count, offset, flags):
    _backend.write_zeroes(
        offset,
        count,
        may_unmap=bool(flags & nbdkit.FLAG_MAY_TRIM),
        fua=bool(flags & nbdkit.FLAG_FUA),
    )
