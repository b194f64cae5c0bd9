"""Apply a host power cut offline: put back a policy-chosen part of a powerfail journal.

Every write in the journal that is not durable may be lost. The policy picks
which: all of them, none, a seeded random subset, an ordered prefix (the
host wrote back in completion order and stopped somewhere), or torn sectors
(each block of each write independently). Durable writes are never reverted.

For each block the journal holds a chain of versions (see
`harness.durability.journal`): the base (the pre-image of the first write to it),
then the data of each write in turn. The block ends up holding the data of
the last write in its chain that survives, or the base when none does — so
losing a later write while keeping an earlier one restores the earlier
write's data, never the pre-flush image.
"""

from __future__ import annotations

import logging
import os
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.durability.contract import CutPolicy, parse_policy
from harness.durability.journal import Preimage, read_journal, reset_journal
from harness.errors import ConfigError, JournalError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RevertedWrite:
    seq: int
    offset: int
    length: int
    kind: str
    completion: int | None  # completion index, None if it was still in flight
    blocks_reverted: int
    blocks_total: int


@dataclass(frozen=True)
class CutResult:
    image: str
    journal: str
    policy: str
    seed: int
    sector_size: int
    writes_journaled: int
    writes_durable: int
    writes_not_durable: int
    writes_kept: int
    writes_reverted: int
    writes_torn: int
    blocks_restored: int
    bytes_restored: int
    torn_tail_bytes: int
    dry_run: bool
    reverted: list[RevertedWrite] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.policy} (seed {self.seed}): {self.writes_not_durable} of "
            f"{self.writes_journaled} journaled writes not durable; kept {self.writes_kept}, "
            f"reverted {self.writes_reverted}, torn {self.writes_torn}; "
            f"{self.blocks_restored} blocks ({self.bytes_restored} bytes) restored"
        )


@dataclass(frozen=True)
class JournaledWrite:
    """One write as the journal knows it (its pre-image may span several records)."""

    seq: int
    kind: str
    offset: int
    length: int


def _writes(preimages: list[Preimage]) -> dict[int, JournaledWrite]:
    spans: dict[int, tuple[str, int, int]] = {}
    for p in preimages:
        kind, start, end = spans.get(
            p.seq, (p.kind.name.lower().replace("_", "-"), p.offset, p.offset + p.length)
        )
        spans[p.seq] = (kind, min(start, p.offset), max(end, p.offset + p.length))
    return {seq: JournaledWrite(seq, k, a, b - a) for seq, (k, a, b) in spans.items()}


def _choose(
    policy: CutPolicy,
    seed: int,
    candidates: list[JournaledWrite],
    completion: dict[int, int],
    granularity: int,
) -> dict[int, set[int] | bool]:
    """For each non-durable write: True (kept), False (lost), or the set of kept block numbers."""
    rng = random.Random(seed)
    if policy is CutPolicy.LOSE_ALL:
        return {p.seq: False for p in candidates}
    if policy is CutPolicy.KEEP_ALL:
        return {p.seq: True for p in candidates}
    if policy is CutPolicy.RANDOM:
        return {p.seq: rng.random() < 0.5 for p in candidates}
    if policy is CutPolicy.PREFIX:
        never = 1 << 62  # still in flight: after every completed write
        order = sorted(candidates, key=lambda p: (completion.get(p.seq, never), p.seq))
        point = rng.randint(0, len(order))
        return {p.seq: i < point for i, p in enumerate(order)}
    torn: dict[int, set[int] | bool] = {}
    for p in sorted(candidates, key=lambda p: p.seq):
        first = p.offset // granularity
        count = -(-p.length // granularity)
        torn[p.seq] = {first + i for i in range(count) if rng.random() < 0.5}
    return torn


def apply_cut(
    image: Path | str,
    journal: Path | str,
    policy: CutPolicy | str,
    seed: int,
    *,
    dry_run: bool = False,
    reset: bool = True,
) -> CutResult:
    """Revert the image as the policy says; then empty the journal (unless dry_run or not reset)."""
    image = Path(image)
    journal = Path(journal)
    policy = parse_policy(policy)
    state, data = read_journal(journal)
    g = state.header.sector_size
    try:
        image_size = image.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"image {image} does not exist") from None
    if image_size != state.header.image_size:
        raise JournalError(
            f"journal {journal} belongs to an image of {state.header.image_size} bytes but "
            f"{image} has {image_size}; pass the journal written for this image"
        )
    if state.torn_bytes:
        log.warning("journal %s: ignoring a torn tail of %d bytes", journal, state.torn_bytes)

    writes = _writes(state.preimages)
    candidates = [w for w in writes.values() if not state.is_durable(w.seq)]
    durable_seqs = {seq for seq in writes if state.is_durable(seq)}
    choice = _choose(policy, seed, candidates, state.completion, g)

    def survives(seq: int, block: int) -> bool:
        if seq in durable_seqs:
            return True
        kept = choice[seq]
        return kept if isinstance(kept, bool) else block in kept

    # Chains of versions per block, in journal (= application) order.
    chains: dict[int, list[tuple[Preimage, int]]] = defaultdict(list)
    for p in state.preimages:
        first = p.offset // g
        for i in range(-(-p.length // g)):
            chains[first + i].append((p, i * g))

    reverted_blocks: dict[int, int] = defaultdict(int)
    restores: list[tuple[int, memoryview]] = []
    view = memoryview(data)
    for block, chain in chains.items():
        last = -1
        for i, (p, _off) in enumerate(chain):
            if survives(p.seq, block):
                last = i
        if last == len(chain) - 1:
            continue  # the image already holds the surviving version
        for p, _off in chain[last + 1 :]:
            reverted_blocks[p.seq] += 1
        nxt, off = chain[last + 1]  # its pre-image is the surviving version's data
        size = min(g, nxt.length - off)
        restores.append(
            (block * g, view[nxt.payload_offset + off : nxt.payload_offset + off + size])
        )

    bytes_restored = sum(len(b) for _o, b in restores)
    if not dry_run and restores:
        fd = os.open(image, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for offset, buf in sorted(restores, key=lambda r: r[0]):
                os.pwrite(fd, buf, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    reverted: list[RevertedWrite] = []
    kept = torn = 0
    for w in candidates:
        total = -(-w.length // g)
        lost_blocks = reverted_blocks.get(w.seq, 0)
        chosen = choice[w.seq]
        survived_any = chosen if isinstance(chosen, bool) else bool(chosen)
        if isinstance(chosen, set) and 0 < len(chosen) < total:
            torn += 1
        elif survived_any:
            kept += 1
        if chosen is False or (isinstance(chosen, set) and len(chosen) < total):
            reverted.append(
                RevertedWrite(
                    w.seq,
                    w.offset,
                    w.length,
                    w.kind,
                    state.completion.get(w.seq),
                    lost_blocks,
                    total,
                )
            )
    result = CutResult(
        image=str(image),
        journal=str(journal),
        policy=policy.value,
        seed=seed,
        sector_size=g,
        writes_journaled=len(writes),
        writes_durable=len(durable_seqs),
        writes_not_durable=len(candidates),
        writes_kept=kept,
        writes_reverted=len(candidates) - kept - torn,
        writes_torn=torn,
        blocks_restored=len(restores),
        bytes_restored=bytes_restored,
        torn_tail_bytes=state.torn_bytes,
        dry_run=dry_run,
        reverted=reverted,
    )
    for _offset, buf in restores:
        buf.release()
    restores.clear()
    view.release()
    if not isinstance(data, bytes):
        data.close()
    if not dry_run and reset:
        # The host came back: nothing is owed any more, the image is the new base.
        reset_journal(journal, state.header)
    log.info("cut %s: %s", image, result.summary())
    return result
