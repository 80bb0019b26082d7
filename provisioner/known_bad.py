"""Known-bad bookkeeping: mirror objects that served bytes which failed verification.

Before each try of a file its object is identified on every mirror with a HEAD (ETag,
size, Last-Modified); `fetch_policy.judge_source` drops a mirror whose object is missing
or not the signed size, or is recorded in `quarantine/known-bad.json`, has not changed
since, and whose retry time has not come. After a checksum mismatch (or an oversize
object) that one mirror alone sent, that object is recorded (docs/provisioner.md,
"Quarantine") with its strikes: it is fetched again after `fetch_policy.known_bad_delay`
(10 minutes, doubling with every failure, at most 6 hours), so a transient corruption -
in transit, or a bitrot heal on the mirror that keeps the ETag - heals by itself. The
cache drops the records once the file verifies; `tts-provisioner known-bad clear` drops
them on an operator's command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import structlog

from .cache import CacheWriter
from .fetch_policy import Skip, judge_source, known_bad_delay, utc_text
from .fetch_state import FileJob
from .mirrors import MirrorSet

log = structlog.get_logger("provisioner.download")  # the download loop's events, one logger


@dataclass
class KnownBad:
    """The bookkeeping for one model version's files."""
    cache: CacheWriter
    mirrors: MirrorSet
    name: str
    version: str
    clock: Callable[[], float] = field(default=time.time)  # wall clock: records outlive the process

    def screen(self, job: FileJob, urls: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (mirror, URL) pairs worth a try; the others are excluded for this file and
        the last one's reason becomes its cause."""
        path = job.entry.path
        job.sources.identities = self.mirrors.identities(self.name, self.version, path, [m for m, _ in urls])
        known = self.cache.known_bad()
        key = self.mirrors.object_key(self.name, self.version, path)
        now = self.clock()
        kept = []
        for mirror, url in urls:
            verdict = judge_source(mirror, job.entry, job.sources.identities.get(mirror), known.get(f"{mirror} {key}"),
                                   now)
            if isinstance(verdict, Skip):
                job.sources.excluded.add(mirror)
                job.retry = replace(job.retry, cause=verdict.cause)
                verdict.note.emit(log, model=self.name, version=self.version, file=path)
                continue
            if verdict.forget_record:
                self.cache.forget_known_bad(mirror, key)
            kept.append((mirror, url))
        return kept

    def record(self, job: FileJob, mirror: str, cause: str, got_sha256: str | None, got_size: int) -> None:
        """`mirror`'s object (as identified before the try) served these bad bytes: one more
        strike, and a wait before it is fetched again that doubles with each."""
        entry = job.entry
        key = self.mirrors.object_key(self.name, self.version, entry.path)
        now = self.clock()
        made: dict = {}

        def add(state: dict[str, dict]) -> dict[str, dict]:
            before = state.get(f"{mirror} {key}") or {}
            again = before.get("expected_sha256") == entry.sha256
            strikes = int(before.get("strikes", 1)) + 1 if again else 1
            retry = now + known_bad_delay(strikes)
            made.update({
                "error": cause, "object": job.sources.identities[mirror], "model": self.name,
                "version": self.version, "file": entry.path, "expected_sha256": entry.sha256,
                "got_sha256": got_sha256, "got_size": got_size, "strikes": strikes,
                "seen": before.get("seen", utc_text(now)) if again else utc_text(now), "last_seen": utc_text(now),
                "retry_after": retry, "retry_after_utc": utc_text(retry), "at": time.time()})
            state[f"{mirror} {key}"] = dict(made)
            return state

        self.cache.update_known_bad(add)
        log.warning("mirror object recorded known bad", model=self.name, version=self.version, file=entry.path,
                    mirror=mirror, strikes=made["strikes"], retry_after=made["retry_after_utc"])
