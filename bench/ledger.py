"""Credit reservations per second under contention on PostgreSQL, next to pgbench.

Many worker processes submit jobs against a few codes: each submission is the gateway's own
reservation transaction (``lifecycle.submit``: the job row, the conditional ``UPDATE`` of the
code, the ledger row). Then the codes are drained to zero by the same workers and the books are
checked: any code whose reserved + spent exceeds its budget, or whose ledger does not sum to its
counters, is an over-spend. pgbench's simple-update run (``-N``) on the same database, with as
many clients, is the yardstick; the same reservation statement sent through bare psycopg, with
no SQLAlchemy session around it, shows how much of the gap any Python client pays. Everything
lives in a private schema, dropped at the end.

``python -m bench.ledger [--workers 8 --codes 4 --seconds 10]``; writes the "ledger" section.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import secrets
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.synchronize import Barrier

import psycopg
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql

from bench.common import cores, load_average, machine, report, table, verdict
from transcription import jobfiles, ledger, lifecycle
from transcription.db.migrate import upgrade
from transcription.db.models import CreditCode, LedgerEntry
from transcription.db.session import Database
from transcription.errors import CreditError

DSN = os.environ.get("WHISPER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
KEY = b"bench-ledger"
JOB_SECONDS = 60


def new_job(code_id: str) -> lifecycle.NewJob:
    job_id = lifecycle.new_job_id()
    return lifecycle.NewJob(
        job_id=job_id,
        code_id=code_id,
        audio_key=jobfiles.audio_key(job_id),
        audio_bytes=1000,
        audio_seconds=JOB_SECONDS - 0.5,
        filename="bench.mp3",
        language=None,
        prompt=None,
        mode="fast",
        engine="local",
        model="tiny.en",
    )


def worker(
    url: str, codes: list[str], index: int, seconds: float | None, start: Barrier, out: object
) -> None:
    """Reserve in a loop for ``seconds`` (or, when None, until every code refuses)."""
    db = Database(url)
    accepted = refused = 0
    exhausted: set[str] = set()
    start.wait()
    began = time.perf_counter()
    turn = index
    while True:
        if seconds is not None and time.perf_counter() - began >= seconds:
            break
        if seconds is None and len(exhausted) == len(codes):
            break
        code = codes[turn % len(codes)]
        turn += 1
        if code in exhausted:
            continue
        try:
            with db.transaction() as session:
                lifecycle.submit(session, new_job(code))
            accepted += 1
        except CreditError:
            refused += 1
            exhausted.add(code)
    db.dispose()
    out.put((accepted, refused, time.perf_counter() - began))  # type: ignore[attr-defined]


def driver_worker(
    url: str, codes: list[str], index: int, seconds: float | None, start: Barrier, out: object
) -> None:
    """The ledger's reservation statement through bare psycopg (prepared), for ``seconds``."""
    assert seconds is not None
    compiled = ledger.reservation_statement().compile(dialect=postgresql.psycopg.dialect())
    schema = url.rsplit("%3D", 1)[-1]
    accepted = 0
    with psycopg.connect(DSN, options=f"-csearch_path={schema}") as conn:
        start.wait()
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            job = lifecycle.queued_job(new_job(codes[(index + accepted) % len(codes)]))
            params = {**compiled.params, **ledger.reservation_params(job)}
            for key, value in params.items():
                if isinstance(value, datetime):  # the columns hold naive UTC
                    params[key] = value.astimezone(UTC).replace(tzinfo=None)
            with conn.transaction():
                if conn.execute(str(compiled), params, prepare=True).fetchone() is None:
                    raise RuntimeError("a bench code refused a reservation")
            accepted += 1
    out.put((accepted, 0, time.perf_counter() - began))  # type: ignore[attr-defined]


def race(
    url: str, codes: list[str], workers: int, seconds: float | None, target: Callable[..., None]
) -> tuple[int, int, float]:
    """Run ``workers`` processes of ``target`` at once; total accepted, refused, and the longest
    wall time."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(workers)
    out = ctx.Queue()
    processes = [
        ctx.Process(target=target, args=(url, codes, i, seconds, start, out))
        for i in range(workers)
    ]
    for p in processes:
        p.start()
    results = [out.get() for _ in processes]
    for p in processes:
        p.join()
    return (
        sum(r[0] for r in results),
        sum(r[1] for r in results),
        max(r[2] for r in results),
    )


def issue(db: Database, count: int, seconds: int) -> list[str]:
    with db.transaction() as session:
        return [
            ledger.issue_code(session, KEY, seconds=seconds, max_uses=10**9).record.id
            for _ in range(count)
        ]


def overspent(db: Database, codes: list[str]) -> int:
    """Codes whose counters break the invariant or disagree with their ledger."""
    bad = 0
    with db.transaction() as session:
        for code_id in codes:
            code = session.get(CreditCode, code_id)
            assert code is not None
            reserved, spent, budget = (
                session.scalar(
                    select(func.coalesce(func.sum(column), 0)).where(LedgerEntry.code_id == code_id)
                )
                for column in (
                    LedgerEntry.reserved_delta,
                    LedgerEntry.spent_delta,
                    LedgerEntry.budget_delta,
                )
            )
            if code.reserved_seconds + code.spent_seconds > code.budget_seconds or (
                reserved,
                spent,
                budget,
            ) != (code.reserved_seconds, code.spent_seconds, code.budget_seconds):
                bad += 1
    return bad


def pgbench(schema: str, clients: int, seconds: float) -> float:
    """pgbench's simple-update TPS with ``clients`` connections, in ``schema``."""
    env = {**os.environ, "PGOPTIONS": f"-c search_path={schema}"}
    base = ["pgbench", "-h", "127.0.0.1", "-U", "postgres"]
    subprocess.run([*base, "-i", "-q", "-s", "1", "test"], env=env, check=True, capture_output=True)
    result = subprocess.run(
        [
            *base,
            "-N",
            "-n",
            "-c",
            str(clients),
            "-j",
            str(min(clients, cores())),
            "-T",
            str(int(seconds)),
            "test",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    found = re.search(r"tps = ([0-9.]+)", result.stdout)
    if found is None:
        raise RuntimeError(f"no TPS in pgbench's output:\n{result.stdout}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--codes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--drain-reservations", type=int, default=200, help="per code")
    args = parser.parse_args()
    load_before = load_average()
    schema = "bench_" + secrets.token_hex(6)
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        url = f"{DSN}?options=-csearch_path%3D{schema}"
        db = Database(url)
        upgrade(db.engine)
        busy = issue(db, args.codes, 10**9)
        accepted, _, wall = race(url, busy, args.workers, args.seconds, worker)
        ours_tps = accepted / wall
        bare, _, bare_wall = race(url, busy, args.workers, args.seconds, driver_worker)
        driver_tps = bare / bare_wall
        tight = issue(db, args.codes, args.drain_reservations * JOB_SECONDS + JOB_SECONDS // 2)
        drained, refused, _ = race(url, tight, args.workers, None, worker)
        bad = overspent(db, busy + tight)
        db.dispose()
        bench_tps = pgbench(schema, args.workers, args.seconds)
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    body = table(
        ["run", "clients", "transactions/s", "notes"],
        [
            [
                "reservations (lifecycle.submit)",
                args.workers,
                ours_tps,
                f"{args.codes} codes, {accepted} reserved in {wall:.1f} s",
            ],
            [
                "same statement, bare psycopg",
                args.workers,
                driver_tps,
                f"prepared, no session: {bare} reserved in {bare_wall:.1f} s",
            ],
            ["pgbench -N (simple update)", args.workers, bench_tps, "scale 1, same database"],
            [
                "drain to zero",
                args.workers,
                "",
                f"{drained} reserved of {args.codes * args.drain_reservations} possible, {refused} refused",
            ],
        ],
    )
    context = (
        f"Machine: {machine()}; PostgreSQL at {DSN.split('@')[-1]}, worker processes: "
        f"{args.workers}, {args.seconds:g} s each run; load average before: {load_before}, "
        f"after: {load_average()}."
    )
    verdicts = [
        verdict(
            "reservations/s ÷ pgbench simple-update TPS", ours_tps / bench_tps, 0.5, at_least=True
        ),
        f"- the same statement through bare psycopg ÷ pgbench: {driver_tps / bench_tps:.3f} "
        f"(the most any Python client reaches here); ours ÷ bare psycopg: "
        f"{ours_tps / driver_tps:.3f}",
        verdict("codes over-spent or out of balance", float(bad), 0),
        verdict(
            "drain: reservations accepted ÷ credit available",
            drained / (args.codes * args.drain_reservations),
            1.0,
        ),
    ]
    report("ledger", "Ledger: reservations under contention vs pgbench", context, body, verdicts)


if __name__ == "__main__":
    main()
