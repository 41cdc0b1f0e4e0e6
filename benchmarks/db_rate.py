"""How many single-row transactions a second the coordinator's database takes: the audit row every upload writes,
one writer, then 8 at once (an input of "How far one coordinator goes" in docs/architecture.md).

    python -m benchmarks.db_rate [SQLALCHEMY_URL]        # default: a new SQLite file, as the coordinator opens it
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from coordinator.audit import AuditLog
from coordinator.store.database import Database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default=f"sqlite:///{tempfile.mkdtemp(prefix='fedmeki-db-rate-')}/c.db")
    parser.add_argument("--rows", type=int, default=300)
    args = parser.parse_args()
    database = Database(args.url)
    database.migrate()
    log = AuditLog(database)

    def write(index: int) -> None:
        log.record("UploadUpdate", f"silo:bench-{index}", "ipv4:127.0.0.1:1", "OK")

    try:
        for writers in (1, 8):
            started = time.perf_counter()
            with ThreadPoolExecutor(writers) as pool:
                list(pool.map(write, range(args.rows)))
            seconds = time.perf_counter() - started
            print(f"{database.engine.url.get_backend_name()}, {writers} writer(s): {args.rows / seconds:.0f} rows/s")
    finally:
        database.dispose()


if __name__ == "__main__":
    main()
