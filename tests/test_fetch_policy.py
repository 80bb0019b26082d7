"""provisioner/fetch_policy.py: every failure of a file and the action it leads to.

Pure tests: no aria2, no S3, no files. The policy's only randomness is the backoff's
jitter; `Jitter` stands in for the `random` module so delays are exact (the real module
is used once, for the bounds).
"""

from __future__ import annotations

import inspect
import random

import pytest

from mirror.manifest import FileEntry
from provisioner import fetch_policy as policy
from provisioner.fetch_policy import (
    AbortOnFullDisk, Backoff, Decision, FileView, GiveUp, HttpOnly, Limits, Mismatch, NextMirror, NoSourceLeft,
    Note, OneMirrorAtATime, Oversize, PeersStalled, Represign, Restart, RetryState, Skip, TaskFailed, TooSlow, Use,
    backoff, check_task, decide, file_deadline, judge_source, known_bad_delay,
)
from provisioner.transfer import ERR_CANNOT_RESUME, ERR_DISK_FULL, ERR_HTTP_STATUS, ERR_NOT_FOUND, ERR_TOO_SLOW

pytestmark = pytest.mark.unit

SHA = "a" * 64
BAD = "b" * 64
ENTRY = FileEntry(path="sub/model.safetensors", size=1000, sha256=SHA)
FILE = FileView("joe/1.0.0", ENTRY, frozenset({"primary", "backup"}))
LIMITS = Limits(max_tries=3)
# aria2 codes that are network trouble (aria2c(1) EXIT STATUS): all handled alike.
NETWORK_CODES = [1, 2, 6, 7, 19, 24, 28, 29]


class Jitter:
    """`random` with a fixed jitter factor; records the bounds it was asked for."""

    def __init__(self, factor: float = 1.0):
        self.factor = factor
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.bounds.append((low, high))
        return self.factor


def failed(code: int, *mirrors: str, message: str = "boom") -> TaskFailed:
    return TaskFailed(code, message, tuple(sorted(mirrors)))


# -- backoff ---------------------------------------------------------------------------

def test_backoff_doubles_from_half_a_second_and_stops_at_30_seconds():
    jitter = Jitter(1.0)
    assert [backoff(n, jitter) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert set(jitter.bounds) == {(0.5, 1.5)}


def test_backoff_jitter_is_half_to_one_and_a_half_times():
    assert backoff(3, Jitter(0.5)) == 2.0 and backoff(3, Jitter(1.5)) == 6.0
    assert backoff(20, Jitter(1.5)) == 45.0  # the cap is before the jitter
    rng = random.Random(7)
    draws = [backoff(2, rng) for _ in range(200)]
    assert all(1.0 <= d <= 3.0 for d in draws) and len(set(draws)) > 100


# -- aria2 task errors -------------------------------------------------------------------

def test_full_disk_aborts_the_attempt_without_counting_or_logging():
    state = RetryState(failures=2, presigns=3)
    assert decide(failed(ERR_DISK_FULL, "primary"), state, FILE, LIMITS) == Decision(AbortOnFullDisk(), state)


def test_http_error_presigns_again_at_once_then_with_backoff():
    jitter = Jitter(1.0)
    first = decide(failed(ERR_HTTP_STATUS, "primary"), RetryState(), FILE, LIMITS, jitter)
    assert first.action == Represign(0.0) and first.state == RetryState(presigns=1)
    assert first.note == Note("warning", "HTTP error from mirror, presigning again and resuming")
    assert jitter.bounds == []  # the first re-presign does not wait
    second = decide(failed(ERR_HTTP_STATUS, "primary"), first.state, FILE, LIMITS, jitter)
    assert second.action == Represign(backoff(1, Jitter(1.0))) == Represign(1.0)
    assert second.state == RetryState(presigns=2)


def test_http_errors_do_not_count_against_max_tries_but_have_their_own_limit():
    state = RetryState(failures=LIMITS.max_tries)
    for n in range(1, policy.MAX_REPRESIGNS + 1):
        d = decide(failed(ERR_HTTP_STATUS, "primary"), state, FILE, LIMITS, Jitter())
        assert isinstance(d.action, Represign), n
        assert d.state == RetryState(failures=LIMITS.max_tries, presigns=n)
        state = d.state
    d = decide(failed(ERR_HTTP_STATUS, "backup", "primary"), state, FILE, LIMITS, Jitter())
    assert d.action == GiveUp("joe/1.0.0: sub/model.safetensors: mirrors ['backup', 'primary'] keep refusing "
                              "the download (HTTP error, aria2 code 22)")
    assert d.state.presigns == policy.MAX_REPRESIGNS + 1
    assert d.note.event == "HTTP error from mirror, presigning again and resuming"  # logged before giving up


def test_max_represigns_is_six():
    assert policy.MAX_REPRESIGNS == 6 and Limits(max_tries=1).max_represigns == 6


def test_a_file_missing_on_one_mirror_goes_to_the_next_at_once():
    d = decide(failed(ERR_NOT_FOUND, "primary"), RetryState(failures=1), FILE, LIMITS)
    assert d.action == NextMirror(frozenset({"primary"}))
    assert d.state == RetryState(failures=1)  # not a failed try
    assert d.note == Note("error", "file missing on mirror")


def test_a_file_missing_on_every_mirror_is_given_up():
    message = "joe/1.0.0: sub/model.safetensors is missing on every mirror"
    both = decide(failed(ERR_NOT_FOUND, "backup", "primary"), RetryState(), FILE, LIMITS)
    assert both.action == GiveUp(message) and both.note.event == "file missing on mirror"
    rest = FileView("joe/1.0.0", ENTRY, FILE.mirrors, excluded=frozenset({"backup"}))
    assert decide(failed(ERR_NOT_FOUND, "primary"), RetryState(), rest, LIMITS).action == GiveUp(message)


def test_a_server_that_cannot_resume_restarts_the_file_with_backoff():
    d = decide(failed(ERR_CANNOT_RESUME, "primary"), RetryState(failures=1), FILE, LIMITS, Jitter(1.0))
    assert d.action == Restart(2.0) and d.state == RetryState(failures=2)
    assert d.note == Note("warning", "mirror cannot resume, restarting file")


@pytest.mark.parametrize("code", NETWORK_CODES)
def test_network_errors_back_off_and_count(code):
    d = decide(failed(code, "primary"), RetryState(presigns=2), FILE, LIMITS, Jitter(1.5))
    assert d.action == Backoff(1.5) and d.state == RetryState(failures=1, presigns=2)
    assert d.note == Note("warning", "download failed, backing off", {"attempt": 1})


@pytest.mark.parametrize("code,restart", [(ERR_CANNOT_RESUME, True)] + [(c, False) for c in NETWORK_CODES])
def test_counted_failures_give_up_after_max_tries(code, restart):
    state = RetryState()
    for n in range(1, LIMITS.max_tries + 1):
        d = decide(failed(code, "primary", message="Connection refused"), state, FILE, LIMITS, Jitter())
        assert isinstance(d.action, Restart if restart else Backoff), n
        state = d.state
    jitter = Jitter()
    d = decide(failed(code, "primary", message="Connection refused"), state, FILE, LIMITS, jitter)
    assert d.action == GiveUp(f"joe/1.0.0: sub/model.safetensors: download failed 4 times (last: aria2 code "
                              f"{code} 'Connection refused' from mirrors ['primary'])", drop_partial=restart)
    assert d.state.failures == 4 and jitter.bounds == []  # no delay drawn for a try that will not come


def test_every_aria2_code_has_an_action():
    kinds = {ERR_NOT_FOUND: NextMirror, ERR_CANNOT_RESUME: Restart, ERR_DISK_FULL: AbortOnFullDisk,
             ERR_HTTP_STATUS: Represign, ERR_TOO_SLOW: NextMirror}
    for code in range(0, 41):
        d = decide(failed(code, "primary"), RetryState(), FILE, LIMITS, Jitter())
        assert isinstance(d.action, kinds.get(code, Backoff)), code


def test_an_unknown_uri_counts_as_a_mirror_nobody_excluded():
    # aria2 reported a URI the attempt did not hand it ("?"): the real mirrors are still left.
    d = decide(failed(ERR_NOT_FOUND, "?"), RetryState(), FILE, LIMITS)
    assert d.action == NextMirror(frozenset({"?"}))


# -- checksum mismatches -----------------------------------------------------------------

def mismatch(*mirrors: str, peers: bool = False, identified=None) -> Mismatch:
    ident = frozenset(mirrors) if identified is None else frozenset(identified)
    return Mismatch(tuple(sorted(mirrors)), peers, ident, BAD, 999)


def cause(sources: str) -> str:
    return (f"checksum mismatch on mirror {sources} for file sub/model.safetensors (expected sha256 {SHA}, "
            f"1000 bytes; got sha256 {BAD}, 999 bytes)")


def test_bad_bytes_from_one_mirror_exclude_it_and_mark_its_object_known_bad():
    d = decide(mismatch("primary"), RetryState(presigns=1), FILE, LIMITS)
    assert d.action == NextMirror(frozenset({"primary"}))
    assert d.state == RetryState(failures=1, presigns=1, cause=cause("primary"))
    assert d.known_bad == "primary"
    assert d.note == Note("error", "checksum mismatch: bytes quarantined")


def test_an_object_not_identified_before_the_try_is_not_marked_known_bad():
    d = decide(mismatch("primary", identified=()), RetryState(), FILE, LIMITS)
    assert d.action == NextMirror(frozenset({"primary"})) and d.known_bad is None


def test_bad_bytes_from_several_mirrors_try_them_one_at_a_time():
    d = decide(mismatch("backup", "primary"), RetryState(), FILE, LIMITS)
    assert d.action == OneMirrorAtATime() and d.known_bad is None
    assert d.state.cause == cause("backup,primary")


def test_bad_bytes_peers_may_have_sent_fall_back_to_http_only():
    web_seeded = decide(mismatch("primary", peers=True), RetryState(), FILE, LIMITS)
    assert web_seeded.action == HttpOnly() and web_seeded.known_bad is None  # peers are not a mirror's fault
    assert web_seeded.state.cause == cause("primary,peers")
    peers_alone = decide(mismatch(peers=True), RetryState(), FILE, LIMITS)
    assert peers_alone.action == HttpOnly() and peers_alone.state.cause == cause("peers")


def test_bad_bytes_of_a_partial_completed_before_a_crash_try_mirrors_one_at_a_time():
    # Nobody is known to have sent them (hashed straight from partial/): no mirror is blamed.
    d = decide(mismatch(), RetryState(), FILE, LIMITS)
    assert d.action == OneMirrorAtATime() and d.known_bad is None and d.state.cause == cause("")


def test_mismatches_give_up_after_max_tries_with_the_cause():
    state = RetryState(failures=LIMITS.max_tries)
    d = decide(mismatch("primary"), state, FILE, LIMITS)
    assert d.action == GiveUp(f"joe/1.0.0: {cause('primary')} (after 4 attempts)")
    assert d.known_bad == "primary"  # recorded even when this was the last try


# -- peers and sources -------------------------------------------------------------------

def test_stalled_peers_fall_back_to_http_without_counting():
    state = RetryState(failures=1, presigns=2, cause="x")
    assert decide(PeersStalled(), state, FILE, LIMITS) == Decision(HttpOnly(), state)


def test_no_source_left_gives_up_with_the_cause_the_operator_needs():
    excluded = FileView("joe/1.0.0", ENTRY, FILE.mirrors, excluded=frozenset({"primary", "backup"}))
    bare = decide(NoSourceLeft(), RetryState(), excluded, LIMITS)
    assert bare.action == GiveUp("joe/1.0.0: sub/model.safetensors: no mirror left to try "
                                 "(excluded: ['backup', 'primary'])")
    why = decide(NoSourceLeft(), RetryState(cause=cause("primary")), excluded, LIMITS)
    assert why.action == GiveUp(f"joe/1.0.0: {cause('primary')}; no other mirror to try")


def test_decide_refuses_what_is_not_a_failure():
    with pytest.raises(TypeError, match="not a download failure"):
        decide("boom", RetryState(), FILE, LIMITS)


# -- which mirrors' objects a try uses ----------------------------------------------------

IDENT = {"etag": '"e1"', "size": 1000, "last_modified": "2024-01-01T00:00:00+00:00"}
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z: the injected wall clock
RECORD = {"error": cause("primary"), "object": IDENT, "expected_sha256": SHA, "seen": "2024-01-02T00:00:00Z",
          "strikes": 1, "retry_after": NOW + 600}


def test_a_missing_object_is_skipped():
    verdict = judge_source("primary", ENTRY, {"missing": True}, RECORD, NOW)
    assert verdict == Skip("sub/model.safetensors is missing on mirror primary",
                           Note("error", "file missing on mirror", {"mirrors": ["primary"]}))


def test_an_object_of_another_size_than_signed_is_not_fetched_at_all():
    for size in (24 * 1000, 999):  # oversize (the attack) or truncated: not the signed file either way
        verdict = judge_source("primary", ENTRY, dict(IDENT, size=size), None, NOW)
        assert verdict == Skip(f"sub/model.safetensors on mirror primary is {size} bytes, the manifest signs 1000",
                               Note("error", "object size differs from the manifest, not fetched",
                                    {"mirror": "primary", "size": size, "expected_size": 1000}))


def test_an_unchanged_known_bad_object_is_skipped_until_its_retry_time():
    verdict = judge_source("primary", ENTRY, dict(IDENT), RECORD, NOW)
    assert verdict == Skip(f"{cause('primary')}, first seen 2024-01-02T00:00:00Z; the object is unchanged "
                           f"(ETag \"e1\"), so it is not fetched again before 2023-11-14T22:23:20Z "
                           f"(`tts-provisioner known-bad clear` to retry now)",
                           Note("warning", "mirror object known bad, not fetched again",
                                {"mirror": "primary", "etag": '"e1"', "retry_after": "2023-11-14T22:23:20Z"}))
    assert isinstance(judge_source("primary", ENTRY, dict(IDENT), RECORD, NOW + 599.9), Skip)
    undated = {k: v for k, v in RECORD.items() if k != "seen"}
    assert "first seen ?;" in judge_source("primary", ENTRY, dict(IDENT), undated, NOW).cause


def test_an_unchanged_known_bad_object_is_fetched_again_once_its_wait_is_over():
    # A transient corruption (or a bitrot heal that keeps the ETag) heals by itself; the record
    # stays until the file verifies, so a second failure waits longer.
    assert judge_source("primary", ENTRY, dict(IDENT), RECORD, NOW + 600) == Use()
    legacy = {k: v for k, v in RECORD.items() if k not in {"retry_after", "strikes"}}  # written before expiry
    assert judge_source("primary", ENTRY, dict(IDENT), legacy, NOW) == Use()


def test_a_changed_or_unidentified_object_is_tried_again_and_its_record_dropped():
    changed = dict(IDENT, etag='"e2"')
    assert judge_source("primary", ENTRY, changed, RECORD, NOW) == Use(forget_record=True)
    assert judge_source("primary", ENTRY, None, RECORD, NOW) == Use(forget_record=True)


def test_objects_without_a_record_for_this_file_are_used():
    assert judge_source("primary", ENTRY, dict(IDENT), None, NOW) == Use()
    assert judge_source("primary", ENTRY, None, None, NOW) == Use()
    other_file = dict(RECORD, expected_sha256="c" * 64)  # a record of another version's bytes
    assert judge_source("primary", ENTRY, dict(IDENT), other_file, NOW) == Use()


def test_known_bad_waits_start_at_ten_minutes_double_and_stop_at_six_hours():
    jitter = Jitter(1.0)
    assert [known_bad_delay(n, jitter) for n in range(1, 9)] == [
        600.0, 1200.0, 2400.0, 4800.0, 9600.0, 19200.0, 21600.0, 21600.0]
    assert set(jitter.bounds) == {(0.5, 1.5)}  # spread, so a fleet does not come back at once
    assert known_bad_delay(1, Jitter(0.5)) == 300.0 and known_bad_delay(50, Jitter(1.5)) == 32400.0


# -- an oversize object -------------------------------------------------------------------

def oversize(*mirrors: str, length: int = 24_000, identified=None) -> Oversize:
    return Oversize(tuple(sorted(mirrors)), frozenset(mirrors if identified is None else identified), length)


def too_large(sources: str, length: int = 24_000) -> str:
    return (f"object too large on mirror {sources} for file sub/model.safetensors (the manifest signs 1000 "
            f"bytes; the mirror sends at least {length})")


def test_a_task_reporting_more_bytes_than_signed_is_stopped():
    args = dict(deadline=None, mirrors=("primary",), identified=frozenset({"primary"}), peers=False)
    assert check_task(ENTRY, 24_000, 0, 0.0, **args) == oversize("primary")  # the length in the headers
    assert check_task(ENTRY, 0, 1001, 0.0, **args) == oversize("primary", length=1001)  # no length: the bytes
    assert check_task(ENTRY, 1000, 1000, 0.0, **args) is None
    assert check_task(ENTRY, 0, 0, 0.0, **args) is None


def test_oversize_bytes_from_one_mirror_are_discarded_and_its_object_marked_known_bad():
    d = decide(oversize("primary"), RetryState(presigns=1), FILE, LIMITS)
    assert d.action == NextMirror(frozenset({"primary"})) and d.known_bad == "primary" and d.discard
    assert d.state == RetryState(failures=1, presigns=1, cause=too_large("primary"))
    assert d.note == Note("error", "object larger than its manifest entry: download stopped")


def test_oversize_bytes_from_several_mirrors_or_an_unidentified_one_blame_nobody():
    several = decide(oversize("backup", "primary"), RetryState(), FILE, LIMITS)
    assert several.action == OneMirrorAtATime() and several.known_bad is None and several.discard
    unidentified = decide(oversize("primary", identified=()), RetryState(), FILE, LIMITS)
    assert unidentified.action == NextMirror(frozenset({"primary"})) and unidentified.known_bad is None


def test_oversize_gives_up_after_max_tries_without_keeping_the_partial():
    d = decide(oversize("primary"), RetryState(failures=LIMITS.max_tries), FILE, LIMITS)
    assert d.action == GiveUp(f"joe/1.0.0: {too_large('primary')} (after 4 attempts)", drop_partial=True)
    assert d.discard and d.known_bad == "primary"


# -- slow mirrors: the lowest speed limit and the per-file deadline -------------------------

def test_the_deadline_is_a_floor_plus_the_file_at_the_slowest_acceptable_speed():
    limits = Limits(max_tries=3, file_deadline=600, deadline_speed=256 * 1024)
    assert file_deadline(FileEntry("big", 1024**3, SHA), limits) == 600 + 4096
    assert file_deadline(ENTRY, Limits(max_tries=3, file_deadline=0)) is None  # 0: no deadline


def test_a_try_past_its_deadline_is_stopped():
    args = dict(mirrors=("primary",), identified=frozenset(), peers=False)
    assert check_task(ENTRY, 1000, 10, 30.5, 30.0, **args) == TooSlow(("primary",), False,
                                                                      "ran past its 30 s deadline")
    assert check_task(ENTRY, 1000, 10, 29.9, 30.0, **args) is None
    assert check_task(ENTRY, 1000, 10, 1e9, None, **args) is None


def test_a_slow_mirror_is_left_for_the_next_at_once_without_counting():
    d = decide(failed(ERR_TOO_SLOW, "primary"), RetryState(failures=1), FILE, LIMITS, Jitter())
    why = "under the lowest speed limit (aria2 code 5)"
    assert d.action == NextMirror(frozenset({"primary"}))
    assert d.state == RetryState(failures=1, cause=f"sub/model.safetensors: download from mirrors ['primary'] "
                                                   f"too slow ({why})")
    assert d.note == Note("warning", "mirror too slow, trying the next one", {"why": why})
    late = decide(TooSlow(("primary",), False, "ran past its 30 s deadline"), RetryState(), FILE, LIMITS)
    assert late.action == NextMirror(frozenset({"primary"})) and "ran past its 30 s deadline" in late.state.cause


def test_with_no_other_mirror_a_slow_download_backs_off_resumes_and_gives_up_after_max_tries():
    slow = TooSlow(("backup", "primary"), False, "ran past its 30 s deadline")
    state = RetryState()
    for n in range(1, LIMITS.max_tries + 1):
        d = decide(slow, state, FILE, LIMITS, Jitter(1.0))
        assert d.action == Backoff(backoff(n, Jitter(1.0))) and d.state.failures == n, n
        state = d.state
    d = decide(slow, state, FILE, LIMITS, Jitter())
    assert d.action == GiveUp("joe/1.0.0: sub/model.safetensors: download from mirrors ['backup', 'primary'] "
                              "too slow (ran past its 30 s deadline), 4 times")


def test_peers_too_slow_fall_back_to_http_only():
    d = decide(TooSlow(("primary",), True, "ran past its 30 s deadline"), RetryState(failures=1), FILE, LIMITS)
    assert d.action == HttpOnly() and d.state == RetryState(failures=1)
    assert d.note.event == "peers and web seed too slow: fetching over HTTP only"


# -- the engine contract -------------------------------------------------------------------

def test_aria2_process_satisfies_the_transfer_engine_protocol():
    from provisioner.aria2 import Aria2Process
    from provisioner.transfer import SeedingEngine, TransferEngine

    for protocol in (TransferEngine, SeedingEngine):
        for name, member in inspect.getmembers(protocol, inspect.isfunction):
            if name.startswith("_"):
                continue
            ours = inspect.signature(getattr(Aria2Process, name))
            assert list(ours.parameters) == list(inspect.signature(member).parameters), name


# -- where a try's deadline starts ----------------------------------------------------------

def test_an_http_try_counts_its_deadline_from_its_start_a_torrent_from_its_web_seed():
    """Stand-ins for the engine and p2p (only what the strategies read), no aria2."""
    from types import SimpleNamespace

    from provisioner.fetch_state import FileJob
    from provisioner.fetch_strategy import HttpStrategy, PeerStrategy
    from provisioner.p2p import PeerFetch
    from provisioner.transfer import TaskStatus

    refreshed = []
    engine = SimpleNamespace(set_web_seeds=lambda gid, uris: refreshed.append(uris))
    http = HttpStrategy(engine)
    job = FileJob(ENTRY, strategy=http, started=100.0)
    assert http.deadline_start(job) == 100.0

    p2p = SimpleNamespace(cfg=SimpleNamespace(stall_seconds=5.0), stall_window=lambda entry: 10.0)
    peers = PeerStrategy(p2p, engine, lambda j: [("primary", "http://m/x")], presign_expiry=60)
    job = FileJob(ENTRY, strategy=peers, started=100.0, gid="g")
    job.peer.fetch = PeerFetch(web_seeds_now=False, started=100.0)
    status = TaskStatus("g", "active", 0, ENTRY.size, 0, 0, "", ())
    assert peers.deadline_start(job) is None  # waiting for peers: the stall windows bound it
    assert peers.watch(job, status, 105.0) is False and peers.deadline_start(job) is None
    assert peers.watch(job, status, 111.0) is False  # past its 10 s window: the mirror is added
    assert peers.deadline_start(job) == 111.0
    assert peers.watch(job, status, 142.0) is False and len(refreshed) == 2  # the URLs refreshed later...
    assert job.peer.fetch.web_seeded_at == 142.0 and peers.deadline_start(job) == 111.0  # ...the start stays
    seeded = PeerFetch(web_seeds_now=True, started=50.0)
    job.peer.fetch = seeded
    assert peers.deadline_start(job) == 50.0
