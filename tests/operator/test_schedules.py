"""Randomised schedules of the cluster shape, in the spirit of TigerBeetle's VOPR.

Each schedule is a seed. A random generator interleaves what the gateway does (submit, cancel,
poll, delete), what kopf does (accept a TranscriptionJob, run its finalizer), what the
reconciler does (``reconcile_pass``), what the cluster does (a pod starts, reports progress,
transcribes, refuses the audio, crashes, is killed, runs twice, outlives its deleted Job; a Job
vanishes or misses its deadline; the garbage collector) and what goes wrong (the operator dies,
halfway through a pass or a handler too, and restarts with nothing in memory; API calls fail,
before or after taking effect; database statements fail, and commits succeed whose answer is
lost; the blob store is unreachable). All of it drives the real code: the gateway's route
functions and runner, the operator's handlers and reconciliation, the transcriber's entry point
and pipeline, ``Lifecycle`` and the ledger on PostgreSQL. Only the Kubernetes API is an in-memory
fake (``simcluster.FakeKube``); its calls are where the operator's threads and the other
processes interleave, so another actor's step may run in the middle of a pass.

After every step the money must add up: per code, spent + reserved within the budget and the
ledger summing to the counters, which match the jobs; each job resolved at most once, and held
exactly while unfinished; no transcript (no text, through the API too) for a job that has not
succeeded, and the files of one that has are there; a cancel refunds a queued job and charges a
running one what was transcribed (rounded up), never more than was reserved. At the end, with the
faults stopped and the cluster running every Job it has, every job must finish within
``FINAL_PASSES`` passes, settled or refunded exactly once, its TranscriptionJob showing the
database's outcome.

``WHISPER_SCHEDULES=<n>`` runs more schedules, ``WHISPER_SCHEDULE_SEED=<seed>`` replays one (a
failure names its seed and the steps that led to it), ``WHISPER_SCHEDULE_STATS=<file>`` writes
what the schedules did and left behind as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import kopf
import psycopg
import pytest
from kubernetes.client.exceptions import ApiException
from sqlalchemy import Connection, event, text
from sqlalchemy.exc import DBAPIError

from gateway.routers.transcriptions import delete_transcription, find_job
from gateway.runners.kubernetes import KubernetesJobRunner
from gateway.schemas import TranscriptionOut
from gateway.services import Services
from gateway.submission import withdraw_job
from tests.operator.simcluster import FINALIZER, FakeKube, clone
from transcriber.job import JobSettings, run_job
from transcriber.pipeline import AudioMissing, Pipeline
from transcription import jobfiles, ledger, lifecycle
from transcription.blobstore import LocalBlobStore
from transcription.db.migrate import upgrade
from transcription.db.models import Base, CreditCode, Job
from transcription.db.session import Database
from transcription.errors import (
    ClusterUnavailable,
    CreditError,
    EngineUnavailable,
    NotFound,
    UndecodableAudio,
)
from transcription.jobfiles import JobFiles, RunRequest
from transcription.lifecycle import Lifecycle, NewJob
from transcription.resources import Phase, job_id_of
from transcription.settings import OperatorSettings
from transcription.states import CreditState, JobStatus, Mode
from transcription.transcript import FORMATS, Segment, TranscriptResult
from transcription_operator import handlers, reconcile
from transcription_operator.context import Context
from transcription_operator.reconcile import Backoff, Reconciler, reconcile_pass

SCHEDULES = int(os.environ.get("WHISPER_SCHEDULES", "200"))
ONE_SEED = os.environ.get("WHISPER_SCHEDULE_SEED")
STATS = os.environ.get("WHISPER_SCHEDULE_STATS")
#: Random steps per schedule, before the faults stop.
STEPS = 40
#: Passes (10 s apart, so past the longest backoff) within which every job must finish.
FINAL_PASSES = 50
KEY = b"schedule-test-code-key"
#: The API calls the trace shows.
MUTATIONS = {"create_tj", "delete_tj", "create_job", "delete_job", "patch_tj_status"}
NAMESPACE = "default"


Choices = list[tuple[float, Callable[[], None]]]
# The kopf handlers, called as kopf calls them (its decorators type them for kopf alone).
ACCEPT = cast(Callable[..., None], handlers.accept)
FINALIZE = cast(Callable[..., None], handlers.cancel)


class Crash(BaseException):
    """The operator process dies here (a BaseException, so nothing in it catches it)."""


class Broken(BaseException):
    """An invariant does not hold; nothing in the code under test may swallow it."""


@dataclass
class Faults:
    """What goes wrong, each a probability per occasion."""

    db: float = 0.0  # a statement fails (the transaction rolls back)
    commit_lost: float = 0.0  # a commit succeeds but its caller sees an error
    api: float = 0.0  # an API call fails, before or after it took effect
    crash: float = 0.0  # the operator dies at an API call
    interleave: float = 0.0  # another actor's step runs at an operator's API call
    blob: float = 0.0  # a blob store call of the gateway or the operator fails

    @classmethod
    def draw(cls, rng: random.Random) -> Faults:
        return cls(
            db=rng.choice([0.0, 0.0, 0.0, 0.03, 0.1]),
            commit_lost=rng.choice([0.0, 0.0, 0.02]),
            api=rng.choice([0.0, 0.0, 0.02, 0.06]),
            crash=rng.choice([0.0, 0.0, 0.01, 0.03]),
            interleave=rng.choice([0.0, 0.1, 0.25]),
            blob=rng.choice([0.0, 0.0, 0.0, 0.03, 0.1]),
        )


class SimEngine:
    """Transcribes any audio into a fixed text at once, or fails the way it is told to."""

    name = "local"
    model = "sim"

    def __init__(self, request: RunRequest, behaviour: str) -> None:
        self.request = request
        self.behaviour = behaviour

    def transcribe(
        self,
        audio: Path,
        *,
        language: str | None = None,
        prompt: str | None = None,
        mode: Mode = Mode.FAST,
        on_progress: Callable[[float], None] | None = None,
        checkpoints: Any = None,
        temperature: float | None = None,
        word_timestamps: bool = True,
    ) -> TranscriptResult:
        duration = self.request.audio_seconds
        if on_progress is not None:
            on_progress(duration / 3)
        if self.behaviour == "reject":
            raise UndecodableAudio("The audio cannot be decoded.")
        if self.behaviour == "unavailable":
            raise EngineUnavailable("The engine is rate limited.")
        if self.behaviour == "crash":
            raise RuntimeError("the transcriber crashed")
        if on_progress is not None:
            on_progress(duration)
        return TranscriptResult(
            segments=[Segment(id=0, start=0.0, end=duration, text=words(self.request.job_id))],
            language=language or "en",
            duration=duration,
            model=self.model,
            mode=mode,
        )


def words(job_id: str) -> str:
    return f"the words of {job_id}"


class HeldAudio(LocalBlobStore):
    """The store as a pod that downloaded its audio before the job was tidied sees it; with
    ``racing`` the job is tidied only after the pod's last look at it, too."""

    def __init__(self, root: Path, audio: Path, *, racing: bool) -> None:
        super().__init__(root)
        self.audio = audio
        self.racing = racing

    def local_path(self, key: str) -> Path:
        return self.audio if key.endswith("/audio.mp3") else super().local_path(key)

    def exists(self, key: str) -> bool:
        return (self.racing and key.endswith("/audio.mp3")) or super().exists(key)


class FaultyBlobs(LocalBlobStore):
    """The blob store as the gateway or the operator sees it: a call may fail (an outage)."""

    def __init__(self, root: Path, sim: Schedule, component: str) -> None:
        super().__init__(root)
        self.sim = sim
        self.component = component

    def get_bytes(self, key: str) -> bytes:
        self.sim.blob_call(self.component, "get")
        return super().get_bytes(key)

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> str:
        self.sim.blob_call(self.component, "put")
        return super().put_bytes(key, data, content_type=content_type)

    def exists(self, key: str) -> bool:
        self.sim.blob_call(self.component, "exists")
        return super().exists(key)

    def delete(self, key: str) -> None:
        self.sim.blob_call(self.component, "delete")
        super().delete(key)

    def delete_prefix(self, prefix: str) -> int:
        self.sim.blob_call(self.component, "delete_prefix")
        return super().delete_prefix(prefix)


class CheckedLifecycle(Lifecycle):
    """The real lifecycle; each cancel is checked against the credit rules as it happens."""

    def __init__(self, db: Database, blobs: LocalBlobStore, sim: Schedule) -> None:
        super().__init__(db, blobs)
        self.sim = sim

    def cancel(self, job_id: str) -> Job | None:
        before = self.sim.row(job_id)
        reported = self.sim.pod_files.read_progress(job_id)
        try:
            return super().cancel(job_id)
        finally:
            self.sim.check_cancel(job_id, before, reported)


@dataclass
class Env:
    """What every schedule of one test shares: the schema and three engines on it."""

    operator_db: Database
    gateway_db: Database
    oracle: Database
    probe: Connection  # the oracle's, autocommit: each invariant check is one round trip
    url: str
    root: Path
    current: list[Schedule] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    @property
    def sim(self) -> Schedule | None:
        return self.current[0] if self.current else None


class Schedule:
    """One seeded schedule: the actors, the fault plan and the invariants."""

    def __init__(self, seed: int, env: Env) -> None:
        self.seed = seed
        self.env = env
        self.rng = random.Random(seed)
        self.trace: list[str] = []
        self.clock = 0.0
        self.faults = Faults.draw(self.rng)
        self.actor = "test"
        self.depth = 0
        self.operator_up = True
        self.accepted: set[str] = set()  # uids kopf has run accept for since it started
        self.first_body: dict[str, dict[str, Any]] = {}
        self.zombies: list[RunRequest] = []
        self.fractions: dict[str, float] = {}
        self.jobs: list[str] = []
        self.statuses: dict[str, str] = {}  # as the last check saw them
        self.room: dict[str, tuple[int, int]] = {}  # code → uses and seconds left, likewise
        self.job_code: dict[str, CreditCode] = {}

        self.root = env.root / f"s{seed}"
        self.blobs = LocalBlobStore(self.root / "blobs")
        self.pod_files = JobFiles(LocalBlobStore(self.root / "blobs"))
        self.held_audio = self.root / "held-audio.mp3"
        self.held_audio.write_bytes(b"ID3 held audio")
        self.job_settings = JobSettings(
            blob_url=self.blobs.root.as_uri(),
            termination_message_path=self.root / "termination-log",
            progress_interval=0,
            database_url="postgresql://nowhere.invalid/none",
        )
        self.kube = FakeKube(NAMESPACE)
        self.kube.hook = self.api_hook
        self.settings = OperatorSettings(
            namespace=NAMESPACE,
            database_url=env.url,
            blob_url=self.blobs.root.as_uri(),
            code_secret=KEY.decode(),
            max_running_jobs=self.rng.choice([0, 1, 2, 3]),
            max_attempts=self.rng.choice([1, 2, 3]),
            reconcile_interval=5.0,
        )
        self.gateway_blobs = FaultyBlobs(self.blobs.root, self, "gateway")
        self.operator_lc = CheckedLifecycle(
            env.operator_db, FaultyBlobs(self.blobs.root, self, "operator"), self
        )
        self.gateway_lc = CheckedLifecycle(env.gateway_db, self.gateway_blobs, self)
        kube = cast(Any, self.kube)
        self.ctx = Context(
            settings=self.settings,
            db=env.operator_db,
            lifecycle=self.operator_lc,
            files=self.operator_lc.files,
            code_key=KEY,
            core=kube,
            batch=kube,
            custom=kube,
        )
        self.memo = kopf.Memo(ctx=self.ctx, reconciler=Reconciler(self.ctx))
        self.backoff = Backoff(base=5.0)
        runner = KubernetesJobRunner(self.gateway_lc, namespace=NAMESPACE)
        runner._custom = kube
        self.services = cast(
            Services,
            SimpleNamespace(db=env.gateway_db, lifecycle=self.gateway_lc, runner=runner),
        )
        self.codes: list[CreditCode] = []
        with env.oracle.transaction() as session:
            for _ in range(self.rng.randint(1, 3)):
                issued = ledger.issue_code(
                    session,
                    KEY,
                    seconds=self.rng.randint(20, 300),
                    max_uses=self.rng.randint(1, 4),
                )
                self.codes.append(issued.record)

    # --- the run ----------------------------------------------------------------------------

    def run(self) -> None:
        self.note(f"faults {self.faults}, settings max_running_jobs="
                  f"{self.settings.max_running_jobs} max_attempts={self.settings.max_attempts}")  # fmt: skip
        try:
            self.check()
            for _ in range(STEPS):
                self.step()
                self.check()
            self.converge()
        except Broken as exc:
            pytest.fail(f"schedule {self.seed} broke an invariant: {exc}\n{self.replay()}",
                        pytrace=False)  # fmt: skip
        except Exception as exc:
            raise AssertionError(f"schedule {self.seed} raised {exc!r}\n{self.replay()}") from exc

    def replay(self) -> str:
        steps = "\n  ".join(self.trace[-60:])
        return f"replay: WHISPER_SCHEDULE_SEED={self.seed}\nlast steps:\n  {steps}"

    def step(self) -> None:
        self.clock += self.rng.uniform(0.2, 3.0)
        self.kube.seconds = self.clock
        choices = self.gateway_steps(submit=3.5, cancel=3, poll=2)
        choices.append((0.5, self.change_faults))
        if self.operator_up:
            choices += self.kopf_steps()
            choices += [(7, self.reconcile), (0.6, self.crash)]
        else:
            choices.append((3, self.restart))
        choices += self.cluster_steps()
        chosen = self.pick(choices)
        self.count(f"step {chosen.__name__}")
        chosen()

    def pick(self, choices: Choices) -> Callable[[], None]:
        total = sum(weight for weight, _ in choices)
        point = self.rng.uniform(0, total)
        for weight, choice in choices:
            point -= weight
            if point <= 0:
                return choice
        return choices[-1][1]

    def gateway_steps(self, *, submit: float, cancel: float, poll: float) -> Choices:
        """What clients and admins can do now."""
        choices: Choices = [(submit, self.submit)]
        if self.jobs:
            running = JobStatus.RUNNING in self.statuses.values()
            choices += [(cancel * (2 if running else 0.5), self.cancel), (poll, self.poll)]
        if self.kube.tjs:
            choices.append((0.4, self.kubectl_delete))
        return choices

    def kopf_steps(self) -> Choices:
        """The handlers kopf has to run now."""
        choices: Choices = []
        if self.fresh_tjs():
            choices.append((4, self.kopf_accept))
        if self.deleting_tjs():
            choices.append((3, self.kopf_finalize))
        return choices

    def cluster_steps(self) -> Choices:
        """What the Job controller, the kubelets and the garbage collector can do now."""
        jobs = list(self.kube.jobs)
        active = [name for name in jobs if self.active(name)]
        choices: Choices = []
        if any(self.running(name) and not self.active(name) for name in jobs):
            choices.append((4, self.pod_start))
        if active:
            choices += [
                (4, self.pod_progress),
                (2, self.pod_succeed),
                (0.6, self.pod_reject),
                (0.8, self.pod_crash),
                (0.5, self.pod_killed),
                (0.3, self.job_deadline),
            ]
        if jobs:
            choices += [(0.6, self.pod_twice), (1, self.job_vanish)]
        if self.zombies:
            choices.append((0.8, self.zombie_run))
        owners = {tj["metadata"]["uid"] for tj in self.kube.tjs.values()}
        if any(
            ref["uid"] not in owners
            for job in self.kube.jobs.values()
            for ref in job["metadata"]["ownerReferences"]
        ):
            choices.append((2, self.collect_garbage))
        return choices

    def fresh_tjs(self) -> list[str]:
        """TranscriptionJobs kopf has not yet run accept for (since it started)."""
        return [
            name for name, tj in self.kube.tjs.items()
            if tj["metadata"]["uid"] not in self.accepted
            and not tj["metadata"].get("deletionTimestamp")
        ]  # fmt: skip

    def deleting_tjs(self) -> list[str]:
        return [
            name for name, tj in self.kube.tjs.items()
            if tj["metadata"].get("deletionTimestamp") and FINALIZER in tj["metadata"]["finalizers"]
        ]  # fmt: skip

    def count(self, what: str) -> None:
        self.env.stats[what] += 1

    def note(self, line: str) -> None:
        prefix = "    " * self.depth
        self.trace.append(f"{prefix}{self.clock:7.1f} {self.actor:8} {line}")

    def name(self, job_id: str | None) -> str:
        return f"j{self.jobs.index(job_id)}" if job_id in self.jobs else str(job_id)

    # --- faults -----------------------------------------------------------------------------

    def api_hook(self, verb: str, when: str, name: str) -> None:
        if when == "after" and verb in MUTATIONS:
            name, _, detail = name.partition(" ")
            self.note(f"  {verb} {self.name(job_id_of(name))} {detail}")
        if self.actor == "operator":
            if self.rng.random() < self.faults.crash:
                self.count(f"crash at {verb} {when}")
                self.note(f"CRASH at {verb} ({when})")
                raise Crash(verb)
            if self.rng.random() < self.faults.api:
                self.count("operator API error")
                self.note(f"API error at {verb} ({when})")
                raise ApiException(status=self.rng.choice([500, 503, 429]), reason="injected")
            if self.depth == 0 and self.rng.random() < self.faults.interleave:
                self.interleave()
        elif self.actor == "gateway" and self.rng.random() < self.faults.api:
            self.note(f"API error at {verb} ({when})")
            raise ApiException(status=503, reason="injected")

    def db_statement(self, component: str) -> None:
        if self.rng.random() < self.faults.db:
            self.count(f"DB error in the {component}")
            self.note(f"DB error in the {component}")
            raise psycopg.OperationalError("injected: the server closed the connection")

    def db_committed(self, component: str) -> None:
        if self.rng.random() < self.faults.commit_lost:
            self.count(f"DB commit lost in the {component}")
            self.note(f"DB commit answer lost in the {component}")
            raise psycopg.OperationalError("injected: connection lost after COMMIT")

    def blob_call(self, component: str, call: str) -> None:
        if self.rng.random() < self.faults.blob:
            self.count(f"blob store error in the {component}")
            self.note(f"blob store error at {call} in the {component}")
            raise ConnectionError("injected: the blob store is unreachable")

    def change_faults(self) -> None:
        self.actor = "test"
        self.faults = Faults.draw(self.rng)
        self.note(f"faults now {self.faults}")

    def interleave(self) -> None:
        """Another actor acts while an operator's call is in flight: a client, a kopf handler
        in another thread, the cluster."""
        choices = self.gateway_steps(submit=2, cancel=4, poll=1)
        choices += self.kopf_steps() + self.cluster_steps()
        actor = self.actor
        self.depth += 1
        chosen = self.pick(choices)
        self.count(f"interleaved {chosen.__name__}")
        try:
            chosen()
        finally:
            self.depth -= 1
            self.actor = actor

    # --- the gateway ------------------------------------------------------------------------

    def submit(self) -> None:
        self.actor = "gateway"
        # Mostly what a code can still pay for; now and then what it cannot (402).
        room = [code for code in self.codes if min(self.room.get(code.id, (0, 0))) >= 1]
        if room and self.rng.random() < 0.85:
            code = self.rng.choice(room)
            seconds = round(self.rng.uniform(1, min(90, self.room[code.id][1])), 1)
        else:
            code = self.rng.choice(self.codes)
            seconds = round(self.rng.uniform(1, 90), 1)
        job_id = f"tr_{self.rng.getrandbits(64):016x}"
        self.upload(code, seconds, job_id, create_tj=self.rng.random() >= 0.15)

    def upload(self, code: CreditCode, seconds: float, job_id: str, *, create_tj: bool) -> None:
        """What the gateway does with an accepted upload: store the audio, submit the job, and
        (unless it dies first) create the TranscriptionJob."""
        self.actor = "gateway"
        key = jobfiles.audio_key(job_id)
        try:
            self.gateway_blobs.put_bytes(key, b"ID3 fake audio", content_type="audio/mpeg")
        except ConnectionError:
            self.note(f"submit {seconds}s: 500 storing the audio")
            return
        new = NewJob(
            job_id=job_id, code_id=code.id, audio_key=key, audio_bytes=14, audio_seconds=seconds,
            filename="a.mp3", language=None, prompt=None, mode="fast", engine="local", model=None,
        )  # fmt: skip
        try:
            with self.env.gateway_db.transaction() as session:
                lifecycle.submit(session, new)
        except (CreditError, DBAPIError) as exc:
            # What _create_job does on any failure; a lost commit leaves the job behind.
            with contextlib.suppress(ConnectionError):
                self.gateway_blobs.delete(key)
            if self.row(job_id) is not None:
                self.jobs.append(job_id)
                self.job_code[job_id] = code
                self.note(f"submit {self.name(job_id)} {seconds}s: committed, answered 500")
            else:
                self.note(f"submit {seconds}s refused: {type(exc).__name__}")
            return
        self.jobs.append(job_id)
        self.job_code[job_id] = code
        if not create_tj:
            self.note(f"submit {self.name(job_id)} {seconds}s, gateway dies before the CR")
            return
        try:
            self.services.runner.submit(job_id)
        except DBAPIError:
            self.note(f"submit {self.name(job_id)} {seconds}s, 500 reading it back")
            return
        except ClusterUnavailable:
            # The create failed, perhaps after taking effect: the gateway refunds and says 503.
            try:
                withdraw_job(self.services, job_id)
            except (DBAPIError, ConnectionError) as exc:
                self.note(f"submit {self.name(job_id)} {seconds}s, 500 refunding: {exc!r}")
                return
            self.note(f"submit {self.name(job_id)} {seconds}s, 503 and refunded")
            return
        self.note(f"submit {self.name(job_id)} {seconds}s")

    def pick_job(self) -> str | None:
        return self.rng.choice(self.jobs) if self.jobs else None

    def cancel(self) -> None:
        """DELETE, mostly of an unfinished job, preferably a running one."""
        self.actor = "gateway"
        running = [j for j in self.jobs if self.statuses.get(j) == JobStatus.RUNNING]
        queued = [j for j in self.jobs if self.statuses.get(j) == JobStatus.QUEUED]
        draw = self.rng.random()
        if running and draw < 0.6:
            job_id: str | None = self.rng.choice(running)
        elif queued and draw < 0.85:
            job_id = self.rng.choice(queued)
        else:
            job_id = self.pick_job()
        if job_id is None:
            return
        code = self.job_code[job_id]
        try:
            if self.rng.random() < 0.15:
                self.note(f"cancel {self.name(job_id)}, gateway dies before deleting the CR")
                self.gateway_lc.cancel(job_id)
                return
            out = delete_transcription(self.services, code, job_id)
            self.note(f"DELETE {self.name(job_id)} -> {out.status} charged {out.charged_seconds}")
        except (NotFound, DBAPIError, ApiException, ConnectionError) as exc:
            self.note(f"DELETE {self.name(job_id)} -> {type(exc).__name__}")

    def poll(self) -> None:
        self.actor = "gateway"
        job_id = self.pick_job()
        if job_id is None:
            return
        try:
            self.read_as_api(job_id)
        except (NotFound, DBAPIError) as exc:
            self.note(f"GET {self.name(job_id)} -> {type(exc).__name__}")

    def read_as_api(self, job_id: str) -> None:
        with self.env.gateway_db.read() as session:
            # What GET /v1/transcriptions/{id} answers.
            job, transcript = find_job(session, self.job_code[job_id], job_id)
            out = TranscriptionOut.build(job, transcript, with_text=True)
        self.note(f"GET {self.name(job_id)} -> {out.status}")
        if out.status != JobStatus.SUCCEEDED:
            if out.text is not None or out.transcript is not None:
                raise Broken(f"GET shows a transcript of {job_id}, which is {out.status}")
        elif out.text != words(job_id) or out.transcript is None:
            raise Broken(f"GET shows no transcript of {job_id}, which succeeded")

    def kubectl_delete(self) -> None:
        self.actor = "admin"
        if not self.kube.tjs:
            return
        name = self.rng.choice(sorted(self.kube.tjs))
        self.note(f"kubectl delete tj {self.name(job_id_of(name))}")
        self.kube.delete_tj(name)

    # --- the operator -----------------------------------------------------------------------

    def as_operator(self, what: str, action: Callable[[], None]) -> None:
        """Run operator code; a crash in it (or in what ran interleaved) takes the process down."""
        if not self.operator_up:
            return
        self.actor = "operator"
        try:
            action()
        except Crash:
            if self.depth > 0:
                raise
            self.operator_up = False
            self.actor = "operator"
            self.note(f"operator died during {what}")
        except (DBAPIError, ApiException, NotFound, ConnectionError) as exc:
            self.actor = "operator"
            self.note(f"{what} failed: {type(exc).__name__} (retried later)")

    def kopf_accept(self) -> None:
        fresh = self.fresh_tjs()
        if not fresh:
            return
        name = self.rng.choice(fresh)
        uid = self.kube.tjs[name]["metadata"]["uid"]
        # kopf may hand over an older body than the current one.
        stale = self.rng.random() < 0.25

        def accept() -> None:
            self.kube.add_finalizer(name)  # kopf's first act on a new object
            self.first_body.setdefault(uid, clone(self.kube.tjs[name]))
            body = self.first_body[uid] if stale else clone(self.kube.tjs[name])
            self.note(f"kopf accept {self.name(job_id_of(name))}{' (stale body)' if stale else ''}")
            try:
                ACCEPT(body=kopf.Body(cast(Any, body)), name=name, memo=self.memo)
            except kopf.PermanentError as exc:
                self.note(f"accept gave up: {exc}")
            self.accepted.add(uid)

        self.as_operator("accept", accept)

    def kopf_finalize(self) -> None:
        deleting = self.deleting_tjs()
        if not deleting:
            return
        name = self.rng.choice(deleting)
        body = clone(self.kube.tjs[name])

        def finalize() -> None:
            self.note(f"kopf finalizer of {self.name(job_id_of(name))}")
            FINALIZE(
                body=kopf.Body(cast(Any, body)), name=name, namespace=NAMESPACE, memo=self.memo
            )
            if (
                name in self.kube.tjs
                and self.kube.tjs[name]["metadata"]["uid"] == body["metadata"]["uid"]
            ):
                self.kube.remove_finalizer(name)

        self.as_operator("finalizer", finalize)

    def reconcile(self) -> None:
        def run() -> None:
            self.note("reconcile pass")
            reconcile_pass(self.ctx, self.backoff)

        self.as_operator("reconcile pass", run)

    def crash(self) -> None:
        self.actor = "operator"
        self.operator_up = False
        self.note("operator killed")

    def restart(self) -> None:
        """A new process: no backoff, no memory; kopf resumes every TranscriptionJob."""
        self.actor = "operator"
        self.operator_up = True
        self.backoff = Backoff(base=5.0)
        self.accepted.clear()
        self.first_body.clear()
        self.note("operator restarted")

    # --- the cluster ------------------------------------------------------------------------

    def pick_k8s_job(self, want: Callable[[str], bool]) -> str | None:
        names = [name for name in self.kube.jobs if want(name)]
        return self.rng.choice(names) if names else None

    def running(self, name: str) -> bool:
        return not self.kube.job_finished(name)

    def active(self, name: str) -> bool:
        """A pod of the Job runs."""
        return self.running(name) and bool(self.kube.jobs[name]["status"].get("active"))

    def request(self, name: str) -> RunRequest:
        container = self.kube.jobs[name]["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["WHISPER_BLOB_URL"] == self.job_settings.blob_url
        return RunRequest.from_env(env)

    def pod_start(self) -> None:
        self.actor = "kubelet"
        name = self.pick_k8s_job(
            lambda n: self.running(n) and not (self.kube.jobs[n]["status"].get("active"))
        )
        if name is not None:
            self.note(f"pod of {self.name(job_id_of(name))} starts")
            self.kube.start_pod(name)

    def pod_progress(self) -> None:
        self.actor = "kubelet"
        name = self.pick_k8s_job(self.active)
        if name is None:
            return
        request = self.request(name)
        fraction = min(0.98, self.fractions.get(name, 0.0) + self.rng.uniform(0.05, 0.4))
        self.fractions[name] = fraction
        self.note(f"pod of {self.name(request.job_id)} at {fraction:.2f}")
        # As the transcriber's progress sink does: a job already finished gets no more records.
        if self.pod_files.has_audio(request.job_id, request.audio_key):
            self.pod_files.write_progress(
                request.job_id, fraction, fraction * request.audio_seconds
            )

    def run_pod(self, name: str, behaviour: str) -> tuple[int, str]:
        """The real transcriber entry point, with the Job's request and no database."""
        request = self.request(name)
        if self.running(name) and not self.kube.jobs[name]["status"].get("active"):
            self.kube.start_pod(name)
        exit_code = run_job(self.job_settings, request, engine=SimEngine(request, behaviour))
        message = self.job_settings.termination_message_path.read_text()
        self.note(f"pod of {self.name(request.job_id)} ran ({behaviour}): {exit_code} {message}")
        return exit_code, message

    def pod_succeed(self) -> None:
        self.actor = "kubelet"
        name = self.pick_k8s_job(self.active)
        if name is not None:
            exit_code, message = self.run_pod(name, "ok")
            self.kube.end_pod(name, exit_code, message, final=True)

    def pod_reject(self) -> None:
        self.actor = "kubelet"
        name = self.pick_k8s_job(self.active)
        if name is None:
            return
        exit_code, message = self.run_pod(name, "reject")
        lost = self.rng.random()
        if lost < 0.3:
            self.note("... and its result record is lost")
            self.blobs.delete(jobfiles.result_key(self.request(name).job_id))
        elif lost < 0.45:
            self.note("... and its termination message too")
            self.blobs.delete(jobfiles.result_key(self.request(name).job_id))
            message = "Error: unreadable audio"
        self.kube.end_pod(name, exit_code, message, final=True)

    def pod_crash(self) -> None:
        self.actor = "kubelet"
        name = self.pick_k8s_job(self.active)
        if name is None:
            return
        exit_code, message = self.run_pod(name, self.rng.choice(["crash", "unavailable"]))
        final = self.rng.random() < 0.4
        self.kube.end_pod(name, exit_code, message, final=final)

    def pod_killed(self) -> None:
        """The pod wrote its result, then was killed before it could exit."""
        self.actor = "kubelet"
        name = self.pick_k8s_job(self.active)
        if name is None:
            return
        self.run_pod(name, "ok")
        final = self.rng.random() < 0.5
        self.note(f"... then killed (final={final})")
        self.kube.end_pod(name, 137, "Killed", final=final)

    def job_deadline(self) -> None:
        self.actor = "kubelet"
        name = self.pick_k8s_job(self.running)
        if name is not None:
            self.note(f"Job of {self.name(job_id_of(name))} passes its deadline")
            self.kube.fail_job(name, "DeadlineExceeded", "Job was active longer than specified")

    def pod_twice(self) -> None:
        """Another pod of the same Job runs (Kubernetes allows it): after the first finished,
        or beside a running one, past its check for an earlier result."""
        self.actor = "kubelet"
        name = self.pick_k8s_job(lambda n: True)
        if name is None:
            return
        if not self.running(name) or self.rng.random() < 0.5:
            exit_code, message = self.run_pod(name, "ok")
            if self.running(name):
                self.kube.end_pod(name, exit_code, message, final=True)
        else:
            self.run_late(self.request(name), "a second pod")

    def run_late(self, request: RunRequest, who: str) -> None:
        """A pod that already holds the audio runs to its end: transcripts and result record."""
        racing = self.rng.random() < 0.5
        blobs = HeldAudio(self.blobs.root, self.held_audio, racing=racing)
        try:
            result = Pipeline(blobs, SimEngine(request, "ok")).run(request, lambda f, s: True)
        except AudioMissing:
            self.note(f"{who} of {self.name(request.job_id)} found its job finished")
            return
        self.pod_files.write_result(result)
        self.note(f"{who} of {self.name(request.job_id)} wrote its transcript and result")

    def job_vanish(self) -> None:
        self.actor = "kubelet"
        name = self.pick_k8s_job(lambda n: True)
        if name is None:
            return
        request = self.request(name)
        alive = self.active(name)
        self.note(f"Job of {self.name(request.job_id)} vanishes")
        self.kube.remove_job(name)
        if alive and self.rng.random() < 0.5:
            self.zombies.append(request)

    def zombie_run(self) -> None:
        self.actor = "kubelet"
        if self.zombies:
            self.run_late(self.zombies.pop(self.rng.randrange(len(self.zombies))), "a zombie pod")

    def collect_garbage(self) -> None:
        self.actor = "kubelet"
        for name in self.kube.collect_garbage():
            self.note(f"garbage collector deletes the Job of {self.name(job_id_of(name))}")

    # --- the end: faults stop, the cluster keeps running ------------------------------------

    def converge(self) -> None:
        """Faults stop; kopf runs what it owes, the cluster runs every Job it has to its end,
        the reconciler passes every 10 s: every job must finish, once, and its
        TranscriptionJob say so."""
        self.actor = "test"
        self.faults = Faults()
        self.note("faults stop")
        if not self.operator_up:
            self.restart()
        lagging: list[str] = []
        for passes in range(1, FINAL_PASSES + 1):
            self.clock += 10.0
            self.kube.seconds = self.clock
            for _ in range(2 * len(self.kube.tjs)):
                self.kopf_accept()
                self.kopf_finalize()
            self.collect_garbage()
            while self.zombies:
                self.zombie_run()
            for name in [n for n in self.kube.jobs if self.running(n)]:
                self.actor = "kubelet"
                exit_code, message = self.run_pod(name, "ok")
                self.kube.end_pod(name, exit_code, message, final=True)
            self.reconcile()
            self.check()
            lagging = self.lagging()
            if not lagging:
                self.count(f"converged in {passes} passes")
                break
        else:
            raise Broken(f"not done after {FINAL_PASSES} passes: {'; '.join(lagging)}")
        self.actor = "test"
        for job_id in self.jobs:
            with contextlib.suppress(NotFound):  # deleted by its owner
                self.read_as_api(job_id)
        unresolved = self.env.probe.execute(
            text(
                "SELECT j.id FROM jobs j WHERE (SELECT count(*) FROM ledger_entries e "
                "WHERE e.job_id = j.id AND e.kind IN ('settle', 'release')) != 1"
            )
        ).all()
        if unresolved:
            raise Broken(f"jobs not resolved exactly once: {unresolved}")
        self.tally()

    def lagging(self) -> list[str]:
        """What is not done yet: unfinished jobs, TranscriptionJobs not showing the outcome."""
        rows = {
            row[0]: row[1:]
            for row in self.env.probe.execute(text("SELECT id, status, charged_seconds FROM jobs"))
        }
        lagging = [
            f"{self.name(job_id)} is {status}"
            for job_id, (status, _) in rows.items()
            if not JobStatus(status).finished
        ]
        for name, tj in self.kube.tjs.items():
            job_id = job_id_of(name)
            status = tj.get("status") or {}
            if tj["metadata"].get("deletionTimestamp"):
                lagging.append(f"the TranscriptionJob of {self.name(job_id)} is being deleted")
            elif job_id not in rows:
                lagging.append(f"TranscriptionJob {name} has no job")
            elif (status.get("phase"), status.get("chargedSeconds")) != (
                Phase(rows[job_id][0].capitalize()),
                rows[job_id][1],
            ):
                lagging.append(
                    f"the TranscriptionJob of {self.name(job_id)} shows {status.get('phase')} "
                    f"charged {status.get('chargedSeconds')}, the database {rows[job_id]}"
                )
        return lagging

    def tally(self) -> None:
        """What the schedule ended with, for the statistics: outcomes, and the files
        finished jobs left behind (not an invariant: a pod that outlives its Job can write after
        the last tidy, and a tidy that fails is not retried)."""
        for job_id, status, code, attempts, deleted in self.env.probe.execute(
            text("SELECT id, status, error_code, attempts, deleted_at IS NOT NULL FROM jobs")
        ):
            self.count(f"job {status} {code or ''}".strip())
            if attempts > self.settings.max_attempts:
                self.count("job with attempts over max_attempts")
            for key in self.blobs.list(jobfiles.work_prefix(job_id)):
                self.count(f"left behind by a {status} job: {key.rsplit('/', 1)[-1]}")
            if status != JobStatus.SUCCEEDED or deleted:
                for fmt in FORMATS:
                    if self.blobs.exists(jobfiles.transcript_key(job_id, fmt)):
                        self.count(f"left behind by a {status} job: transcript")

    # --- invariants -------------------------------------------------------------------------

    def row(self, job_id: str) -> Any:
        return self.env.probe.execute(ROW, {"id": job_id}).first()

    def check_cancel(self, job_id: str, before: Any, reported: jobfiles.Progress | None) -> None:
        """A cancel of a queued job refunds it and gives the use back; of a running one (the
        database says so, or its run has reported progress) it charges at least what the
        database and the run's record say was transcribed, rounded up, never more than was
        reserved, and the use stays spent."""
        after = self.row(job_id)
        if before is None or after is None or JobStatus(before.status).finished:
            return
        if after.status != JobStatus.CANCELLED:
            return  # the cancel failed (a fault); nothing moved
        began = reported is not None and (reported.fraction > 0 or reported.seconds_done > 0)
        running = before.status == JobStatus.RUNNING or began
        self.note(
            f"cancelled {self.name(job_id)} ({before.status}, progress {before.progress:.2f}, "
            f"record {reported.fraction if reported else None}) charged {after.charged_seconds}"
        )
        self.count(f"cancel of a {'running' if running else 'queued'} job")
        if not running:
            if after.credit_state != CreditState.RELEASED or after.charged_seconds != 0:
                raise Broken(f"cancelling queued {job_id} did not refund it: {after}")
            return
        done = before.progress * before.audio_seconds
        if reported is not None:
            done = max(done, reported.fraction * before.audio_seconds, reported.seconds_done)
        least = min(math.ceil(done - 1e-6), before.reserved_seconds)
        if after.credit_state != CreditState.SETTLED or not (
            least <= after.charged_seconds <= before.reserved_seconds
        ):
            raise Broken(
                f"cancelling running {job_id} ({before.status} in the database, {done:.2f} s "
                f"transcribed, {before.reserved_seconds} s reserved) charged "
                f"{after.charged_seconds} ({after.credit_state})"
            )

    def check(self) -> None:
        state = self.env.probe.execute(STATE).scalar_one()
        codes = state["codes"] or []
        sums = {row[0]: tuple(row[1:]) for row in state["sums"] or []}
        jobs = state["jobs"] or []
        resolutions: dict[str, list[str]] = {}
        for job_id, kind in state["resolutions"] or []:
            resolutions.setdefault(job_id, []).append(kind)
        transcripts: dict[str, list[float]] = {}
        for job_id, duration in state["transcripts"] or []:
            transcripts.setdefault(job_id, []).append(duration)
        held: dict[str, int] = {}
        spent: dict[str, int] = {}
        uses: dict[str, int] = {}
        self.statuses = {row[0]: row[2] for row in jobs}
        for job_id, code_id, status, credit, reserved, charged, deleted, attempts in jobs:
            if attempts > self.settings.max_attempts:
                raise Broken(f"{job_id} was run {attempts} times, past max_attempts")
            kinds = resolutions.get(job_id, [])
            finished = JobStatus(status).finished
            if len(kinds) > 1:
                raise Broken(f"{job_id} resolved {len(kinds)} times: {kinds}")
            if finished != (credit != CreditState.HELD) or finished != bool(kinds):
                raise Broken(f"{job_id} is {status} with credit {credit} and resolutions {kinds}")
            if credit == CreditState.HELD:
                held[code_id] = held.get(code_id, 0) + reserved
            if credit == CreditState.SETTLED:
                spent[code_id] = spent.get(code_id, 0) + charged
            if credit != CreditState.RELEASED:
                uses[code_id] = uses.get(code_id, 0) + 1
            expected = {
                JobStatus.SUCCEEDED: {CreditState.SETTLED},
                JobStatus.FAILED: {CreditState.RELEASED},
                JobStatus.CANCELLED: {CreditState.SETTLED, CreditState.RELEASED},
            }.get(JobStatus(status), {CreditState.HELD})
            if credit not in expected:
                raise Broken(f"{job_id} is {status} with credit {credit}")
            if credit == CreditState.RELEASED and charged != 0:
                raise Broken(f"{job_id} was refunded but charged {charged}")
            if charged is not None and not 0 <= charged <= reserved:
                raise Broken(f"{job_id} charged {charged} of {reserved} reserved")
            found = transcripts.get(job_id, [])
            if status != JobStatus.SUCCEEDED and found:
                raise Broken(f"{job_id} is {status} but has a transcript")
            if status == JobStatus.SUCCEEDED and not deleted:
                if len(found) != 1:
                    raise Broken(f"{job_id} succeeded with {len(found)} transcripts")
                duration = found[0]
                if charged != min(math.ceil(duration - 1e-6), reserved):
                    raise Broken(f"{job_id} transcribed {duration} s but charged {charged}")
                for fmt in FORMATS:
                    if not self.blobs.exists(jobfiles.transcript_key(job_id, fmt)):
                        raise Broken(f"{job_id} succeeded but its {fmt} transcript is gone")
        self.room = {row[0]: (row[5] - row[4], row[1] - row[2] - row[3]) for row in codes}
        for code_id, budget, reserved, spent_seconds, used, max_uses in codes:
            counters = (budget, reserved, spent_seconds, used)
            if sums.get(code_id) != counters:
                raise Broken(f"code {code_id}: ledger sums {sums.get(code_id)} != {counters}")
            if spent_seconds + reserved > budget or not 0 <= used <= max_uses:
                raise Broken(f"code {code_id} over-spent: {counters} of {max_uses} uses")
            model = (budget, held.get(code_id, 0), spent.get(code_id, 0), uses.get(code_id, 0))
            if counters != model:
                raise Broken(f"code {code_id}: counters {counters} but its jobs say {model}")


ROW = text(
    "SELECT status, credit_state, progress, audio_seconds, reserved_seconds, charged_seconds "
    "FROM jobs WHERE id = :id"
)
#: Everything the invariants need, in one round trip.
STATE = text(
    """
    SELECT json_build_object(
      'codes', (SELECT json_agg(json_build_array(id, budget_seconds, reserved_seconds,
                                                 spent_seconds, uses, max_uses))
                FROM credit_codes),
      'sums', (SELECT json_agg(json_build_array(code_id, b, r, s, u)) FROM (
                 SELECT code_id, sum(budget_delta) b, sum(reserved_delta) r, sum(spent_delta) s,
                        sum(uses_delta) u
                 FROM ledger_entries GROUP BY code_id) totals),
      'jobs', (SELECT json_agg(json_build_array(id, code_id, status, credit_state,
                                                reserved_seconds, charged_seconds,
                                                deleted_at IS NOT NULL, attempts))
               FROM jobs),
      'resolutions', (SELECT json_agg(json_build_array(job_id, kind)) FROM ledger_entries
                      WHERE kind IN ('settle', 'release')),
      'transcripts', (SELECT json_agg(json_build_array(job_id, duration_seconds))
                      FROM transcripts))
    """
)


# --- the test -----------------------------------------------------------------------------


@pytest.fixture
def env(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """Three engines on one schema (the operator's and the gateway's with faults, the checker's
    without), the reconciler's clock made the schedule's, and logging off (it is all expected)."""
    # Commits need not wait for the disk: nothing here survives a PostgreSQL crash anyway.
    url = f"{pg_url}%20-csynchronous_commit%3Doff"
    dbs = [Database(url) for _ in range(3)]
    upgrade(dbs[2].engine)
    probe = dbs[2].engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    # The blob store's every write is fsynced: on a tmpfs that costs nothing.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm)) if os.access(shm, os.W_OK) else tmp_path
    state = Env(dbs[0], dbs[1], dbs[2], probe, url=url, root=root)
    for db, component in ((dbs[0], "operator"), (dbs[1], "gateway")):
        _inject_faults(db, component, state)

    def clock() -> float:
        sim = state.sim
        return sim.clock if sim is not None else 0.0

    monkeypatch.setattr(reconcile, "time", SimpleNamespace(monotonic=clock))
    logging.disable(logging.CRITICAL)
    try:
        yield state
    finally:
        logging.disable(logging.NOTSET)
        probe.close()
        if root != tmp_path:
            shutil.rmtree(root, ignore_errors=True)
        for db in dbs:
            db.dispose()


def _inject_faults(db: Database, component: str, state: Env) -> None:
    def before_cursor_execute(*_: Any) -> None:
        sim = state.sim
        if sim is not None:
            sim.db_statement(component)

    event.listen(db.engine, "before_cursor_execute", before_cursor_execute)
    dialect = db.engine.dialect
    commit = dialect.do_commit

    def do_commit(dbapi_connection: Any) -> None:
        commit(dbapi_connection)
        sim = state.sim
        if sim is not None:
            sim.db_committed(component)

    dialect.do_commit = do_commit  # type: ignore[method-assign]


def _seeds() -> list[int]:
    if ONE_SEED is not None:
        return [int(ONE_SEED)]
    return list(range(1, SCHEDULES + 1))


#: What a full run must have exercised at least once, lest the schedules quietly stop reaching
#: the paths they are for.
EXERCISED = (
    "cancel of a queued job",
    "cancel of a running job",
    "job succeeded",
    "job failed transcription_failed",
    "job failed audio_undecodable",
    "job failed job_lost",
    "DB error in the operator",
    "DB error in the gateway",
    "DB commit lost in the operator",
    "blob store error in the operator",
    "operator API error",
    "crash at",
    "interleaved",
    "step pod_twice",
    "step zombie_run",
)


@pytest.mark.slow  # a minute or more on two cores; WHISPER_SCHEDULES=20 for a quick look
def test_random_schedules_keep_the_money_right(env: Env) -> None:
    seeds = _seeds()
    for seed in seeds:
        with env.oracle.transaction() as session:
            for table in reversed(Base.metadata.sorted_tables):
                session.execute(table.delete())
        sim = Schedule(seed, env)
        env.current.append(sim)
        try:
            sim.run()
        finally:
            env.current.clear()
            shutil.rmtree(sim.root, ignore_errors=True)
    if STATS:
        Path(STATS).write_text(json.dumps(dict(sorted(env.stats.items())), indent=1))
    if len(seeds) >= 100:
        missing = [what for what in EXERCISED if not any(k.startswith(what) for k in env.stats)]
        assert not missing, f"no schedule exercised: {missing}"


def test_jobs_that_keep_vanishing_run_at_most_max_attempts_times(env: Env) -> None:
    """A bug the schedules found, step by step. A vanished Job is replaced in the pass that
    notices, but the replacement's status write fails (409: the pass's listing predates its own
    requeue), so the status never names it; when it vanishes too, no pass notices, and the next
    admits yet another Job: past ``max_attempts``, for ever if Jobs keep vanishing."""
    sim = Schedule(0, env)
    env.current.append(sim)
    sim.faults = Faults()
    sim.settings.max_attempts = 2
    sim.settings.max_running_jobs = 0
    job_id = f"tr_{0xABC:016x}"
    sim.upload(sim.codes[0], 1.0, job_id, create_tj=True)
    name = job_id.replace("_", "-")
    sim.kube.add_finalizer(name)
    ACCEPT(body=kopf.Body(cast(Any, clone(sim.kube.tjs[name]))), name=name, memo=sim.memo)
    for _ in range(4):
        reconcile_pass(sim.ctx, sim.backoff)  # admits a Job, or replaces one that vanished
        sim.check()
        if name in sim.kube.jobs:
            sim.kube.remove_job(name)  # someone deletes it, or its node goes
    assert sim.row(job_id).status == JobStatus.FAILED
    assert not sim.lagging()
