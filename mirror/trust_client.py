"""The node's view of the signed channel metadata, across every configured mirror.

python-tuf's ngclient `Updater` does the TUF client workflow (root chain, rollback,
expiry, snapshot/targets consistency, delegations, size limits) against one
repository and keeps what it trusts in one metadata directory. A fleet has several
mirrors of the same repository; this module runs one `Updater` per mirror over the
*same* directory, in priority order, so that:

- the newest valid metadata wins: a mirror with newer metadata than what the
  directory holds moves it forward; a mirror with older metadata is refused by
  python-tuf (rollback) or ends below the best one, and is reported by name;
- nothing is trusted that python-tuf did not verify: lookups go to an `Updater`
  that refreshed to the best version;
- a mirror that is slow, too big, unreachable or hostile costs at most its
  deadline per request (`trust_fetch.BucketFetcher`), then the next one is asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog
from tuf.api import exceptions
from tuf.api.metadata import Metadata, TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from .trust import TrustError
from .trust_fetch import DEFAULT_DEADLINE, BucketFetcher

log = structlog.get_logger(__name__)

# Upper bounds before any body is read (python-tuf uses the signed length where
# metadata gives one). Roots and the timestamp are small documents; the ci role grows
# by about 300 bytes per published version.
CONFIG = UpdaterConfig(
    max_root_rotations=64,
    root_max_length=256 * 1024,
    timestamp_max_length=16 * 1024,
    snapshot_max_length=1024 * 1024,
    targets_max_length=8 * 1024 * 1024,
    prefix_targets_with_hash=False,
)


@dataclass(frozen=True)
class Source:
    """One mirror as the trust layer sees it: a name, a lazy S3 client, a bucket."""
    name: str
    client: Callable[[], object]
    bucket: str


@dataclass
class MirrorResult:
    name: str
    state: str  # ok | older | expired | invalid | unreachable | missing
    version: int | None = None
    error: str | None = None


@dataclass
class Refreshed:
    """The outcome of one pass over the mirrors."""
    version: int  # the timestamp version this node now trusts
    mirrors: list[MirrorResult] = field(default_factory=list)
    updaters: list[tuple[str, Updater]] = field(default_factory=list, repr=False)
    requests: int = 0
    bytes: int = 0


def _classify(exc: Exception) -> str:
    if isinstance(exc, exceptions.EqualVersionNumberError):
        return "invalid"
    if isinstance(exc, exceptions.BadVersionNumberError):
        return "older"
    if isinstance(exc, exceptions.ExpiredMetadataError):
        return "expired"
    if isinstance(exc, exceptions.DownloadHTTPError) and exc.status_code in (403, 404):
        return "missing"
    if isinstance(exc, exceptions.DownloadError):
        return "unreachable"
    return "invalid"


class TrustedView:
    def __init__(self, root: bytes, metadata_dir: Path, sources: list[Source],
                 deadline: float = DEFAULT_DEADLINE, config: UpdaterConfig = CONFIG):
        self.root = root
        self.dir = Path(metadata_dir)
        self.sources = sources
        self.deadline = deadline
        self.config = config
        self.last: Refreshed | None = None
        self.results: list[MirrorResult] = []  # each mirror's state in the last refresh
        try:
            Metadata.from_bytes(root)
        except Exception as exc:  # any parse failure of the anchor is a config problem
            raise TrustError(f"the configured trust root is not TUF root metadata: {exc}") from None

    def _trusted_version(self) -> int | None:
        try:
            return Metadata.from_file(str(self.dir / "timestamp.json")).signed.version
        except (OSError, ValueError, exceptions.RepositoryError):
            return None
        except Exception:  # a damaged local file: python-tuf re-fetches it
            return None

    def refresh(self) -> Refreshed:
        """Refresh from every mirror; raise TrustError when none gives valid metadata."""
        self.dir.mkdir(parents=True, exist_ok=True)
        results: list[MirrorResult] = []
        good: list[tuple[str, Updater, int]] = []
        requests = nbytes = 0
        for source in self.sources:
            fetcher = BucketFetcher(source.name, source.client, source.bucket, self.deadline)
            try:
                updater = Updater(str(self.dir), fetcher.base_url, fetcher=fetcher, config=self.config,
                                  bootstrap=self.root)
                updater.refresh()
            except (exceptions.RepositoryError, exceptions.DownloadError) as exc:
                results.append(MirrorResult(source.name, _classify(exc), error=f"{type(exc).__name__}: {exc}"))
            else:
                version = self._trusted_version() or 0
                good.append((source.name, updater, version))
                results.append(MirrorResult(source.name, "ok", version))
            finally:
                requests, nbytes = requests + fetcher.requests, nbytes + fetcher.bytes
        self.results = results
        if not good:
            for result in results:
                log.warning("trust.mirror", mirror=result.name, state=result.state, error=result.error)
            raise TrustError(self._failure(results))
        best = max(v for _, _, v in good)
        for result in results:
            if result.state == "ok" and result.version is not None and result.version < best:
                result.state, result.error = "older", f"timestamp version {result.version}, newest is {best}"
        for result in results:
            if result.state != "ok":
                log.warning("trust.mirror", mirror=result.name, state=result.state, error=result.error)
        self.last = Refreshed(best, results, [(n, u) for n, u, v in good if v == best], requests, nbytes)
        return self.last

    def _failure(self, results: list[MirrorResult]) -> str:
        states = {r.state for r in results}
        detail = "; ".join(f"mirror {r.name}: {r.error}" for r in results)
        if states == {"missing"}:
            return ("no mirror has signed channel metadata (tuf/ is empty): initialise it with "
                    "`tts-mirror trust init` and re-promote the channels, or remove [trust] root from "
                    f"provisioner.toml to keep following unsigned channels ({detail})")
        if "expired" in states:
            expiry = self.expiries().get("timestamp")
            when = f" (the trusted timestamp expired at {expiry})" if expiry else ""
            return (f"signed channel metadata is expired on every mirror{when}: keeping what is installed; "
                    f"the signing host's `tts-mirror trust refresh` timer must run ({detail})")
        return f"no mirror gave valid signed channel metadata: {detail}"

    def target(self, path: str) -> tuple[TargetFile | None, str]:
        """(the signed target for `path` or None, the mirror that answered)."""
        refreshed = self.last or self.refresh()
        errors = []
        for name, updater in refreshed.updaters:
            try:
                return updater.get_targetinfo(path), name
            except (exceptions.RepositoryError, exceptions.DownloadError) as exc:
                errors.append(f"mirror {name}: {type(exc).__name__}: {exc}")
        raise TrustError(f"cannot look up signed target {path}: " + "; ".join(errors))

    def expiries(self) -> dict[str, str]:
        """When each locally trusted top-level role expires (ISO 8601), for status."""
        out = {}
        for role in ("root", "timestamp", "snapshot", "targets"):
            try:
                md = Metadata.from_file(str(self.dir / f"{role}.json"))
            except Exception:  # not there yet, or damaged: python-tuf re-fetches it
                continue
            out[role] = md.signed.expires.isoformat()
        return out

    def status(self) -> dict:
        """What status.json says about trust: versions, expiries and each mirror's state."""
        doc: dict = {"timestamp_version": self._trusted_version(), "expires": self.expiries()}
        try:
            doc["root_version"] = Metadata.from_file(str(self.dir / "root.json")).signed.version
        except Exception:  # no trusted root on disk yet
            doc["root_version"] = None
        if self.results:
            doc["mirrors"] = {r.name: r.state if not r.error else f"{r.state}: {r.error}" for r in self.results}
        return doc
