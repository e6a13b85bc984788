"""MLflow tracking, split by job: the runs a pipeline stage logs (runs.py: :class:`Tracker`), replaying what
could not be sent (pending.py), the comparison tables read back (table.py), and the store's URI with its
secrets redacted (uris.py). The ``ddpm`` command (ddpm/cli.py) drives them. This package is the only part of
the project that imports mlflow, and only inside functions (``import mlflow`` costs ~1.6 s).

The names below are the package's public API (stages import the submodules themselves, so that DVC's deps
name the files they run).
"""
from ddpm.app.tracking.pending import PendingError, import_pending, read_pending
from ddpm.app.tracking.runs import (EXPERIMENT_TAGS, PENDING_PREFIX, WRITER_TAG, Tracker, TrackingError, eq_filter,
                                    filter_pairs, git_commit, kernel_tags, pending_file)
from ddpm.app.tracking.table import (COMPARISONS_ARTIFACT, TABLE_COLUMNS, compare_nll_revs, compare_revs,
                                     comparison_table, experiments, log_comparisons, nll_cross_table, seed_summary)
from ddpm.app.tracking.uris import default_tracking_uri, install_log_redaction, redact, redact_uri, sqlite_path

__all__ = ["COMPARISONS_ARTIFACT", "EXPERIMENT_TAGS", "PENDING_PREFIX", "TABLE_COLUMNS", "WRITER_TAG", "PendingError",
           "Tracker", "TrackingError", "compare_nll_revs", "compare_revs", "comparison_table", "default_tracking_uri",
           "eq_filter", "experiments", "filter_pairs", "git_commit", "import_pending", "install_log_redaction",
           "kernel_tags", "log_comparisons", "nll_cross_table", "pending_file", "read_pending", "redact", "redact_uri",
           "seed_summary", "sqlite_path"]
