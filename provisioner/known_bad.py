"""Known-bad bookkeeping: mirror objects that served bytes which failed verification.

Before each try of a file its object is identified on every mirror with a HEAD (ETag,
size, Last-Modified); `fetch_policy.judge_source` drops a mirror whose object is missing,
or is recorded in `quarantine/known-bad.json` and has not changed since. After a checksum
mismatch of bytes that one mirror alone sent, that object is recorded (docs/provisioner.md,
"Quarantine"); the cache drops the records once the file verifies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import structlog

from .cache import CacheWriter
from .fetch_policy import Skip, judge_source
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

    def screen(self, job: FileJob, urls: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (mirror, URL) pairs worth a try; the others are excluded for this file and
        the last one's reason becomes its cause."""
        path = job.entry.path
        job.sources.identities = self.mirrors.identities(self.name, self.version, path, [m for m, _ in urls])
        known = self.cache.known_bad()
        key = self.mirrors.object_key(self.name, self.version, path)
        kept = []
        for mirror, url in urls:
            verdict = judge_source(mirror, job.entry, job.sources.identities.get(mirror), known.get(f"{mirror} {key}"))
            if isinstance(verdict, Skip):
                job.sources.excluded.add(mirror)
                job.retry = replace(job.retry, cause=verdict.cause)
                verdict.note.emit(log, model=self.name, version=self.version, file=path)
                continue
            if verdict.forget_record:
                self.cache.forget_known_bad(mirror, key)
            kept.append((mirror, url))
        return kept

    def record(self, job: FileJob, mirror: str, cause: str, got_sha256: str, got_size: int) -> None:
        """`mirror`'s object (as identified before the try) served these bad bytes."""
        entry = job.entry
        self.cache.mark_known_bad(mirror, self.mirrors.object_key(self.name, self.version, entry.path), {
            "error": cause, "object": job.sources.identities[mirror], "model": self.name,
            "version": self.version, "file": entry.path, "expected_sha256": entry.sha256,
            "got_sha256": got_sha256, "got_size": got_size,
            "seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
