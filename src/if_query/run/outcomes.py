"""What became of each job (scored, skipped, failed), and under torchrun every rank's outcomes gathered: the jobs
another rank wrote are read back from their files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from if_query import distributed
from if_query.data.jobs import QueryJob
from if_query.errors import IfQueryError, InputError, RunError
from if_query.report.results import QueryResults, read_results


@dataclass
class JobOutcome:
    """What became of one job (a query folder, or the single run): its ``results`` (None when it failed or was
    skipped; the summary's rows or every row, as the runner was asked), the ``files`` it wrote (none when it had no
    output directory), whether ``skipped`` (--skip-done) and its ``error``; ``job`` says which job it was (its
    ``name``: the folder, or ``"query"``; its ``output_dir``)."""

    job: QueryJob
    error: IfQueryError | None = None
    results: QueryResults | None = None
    files: list[Path] = field(default_factory=list)
    skipped: bool = False

    @property
    def ok(self) -> bool:
        """Whether the job ran without an error (scored, or skipped as up to date)."""
        return self.error is None


def collect(outcomes: list[JobOutcome], mine: set[int]) -> None:
    """Fill in the outcomes of the jobs other ranks scored (their status, results from disk)."""
    status = {i: (o.error.exit_code, str(o.error), o.error.option, o.error.flag_first) if o.error
              else ("skipped" if o.skipped else "ok")
              for i, o in enumerate(outcomes) if i in mine}
    for shard in distributed.gather(status):
        for index, state in shard.items():
            outcome = outcomes[index]
            if index in mine:
                continue
            outcome.error = None
            if isinstance(state, tuple):
                kind = InputError if state[0] == InputError.exit_code else RunError
                outcome.error = kind(state[1], state[2], flag_first=state[3])
            elif state == "skipped":
                outcome.skipped = True
            else:
                outcome.results = read_results(outcome.job.output_dir)
