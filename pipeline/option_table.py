"""The trainer's options, written once: the model parameters of wals_core/defaults.py
plus the options of the pipeline (input, output, blocks, exchange, evaluation, re-runs).

Generated from it: WalsOptions' argparse arguments (`python -m pipeline.train --help`),
the tuner's options that are the trainer's (`add_input_options`, and its model options
from wals_core.defaults.PARAMETER) and the options table of docs/options.md
(`markdown_table`, written by scripts/options_table.py).
"""
from __future__ import annotations

from wals_core.defaults import DATA_TYPES, PARAMETERS, Option

# Big enough that a block's solve keeps both cores busy and a half-step pays little
# per-block overhead (10M ratings, k=10, 2 cores, back to back: 2048 -> 0.97 s per
# iteration, 8192 -> 0.80 s, 65536 -> 0.68 s); lower it for more parallel tasks on
# many workers.
DEFAULT_BLOCK_SIZE = 16384
# IDs are stored as fixed-width text arrays (4 bytes per character of the longest
# ID): 256 covers UUIDs, URLs and paths of typical analytics exports.
DEFAULT_MAX_ID_LENGTH = 256
# A line is at most this long (bytes, without its line break): 1 MiB is thousands of
# times any rating line, and keeps memory bounded on a file without newlines.
DEFAULT_MAX_LINE_BYTES = 1 << 20
# |value| above this is a bad line (out_of_range): no star rating, play count or
# seconds on a page comes near it, while one value of 1e20 collapses a model.
DEFAULT_MAX_ABS_VALUE = 1e9
# --exchange auto routes a side whose float32 factor matrix is above this: with one
# copy per SDK process, 1 GiB leaves room for its deserialization, the block cache
# and the solves on a 4 GB-per-process worker (docs "Scale model").
DEFAULT_MAX_BROADCAST_MB = 1024
EXCHANGES = ('auto', 'broadcast', 'routed')
VOCABULARIES = ('local', 'distributed')
GATE_METRICS = ('rmse', 'ndcg')

DATA = 'data'
MODEL = 'model (names and defaults of the original trainer)'
OBJECTIVE = 'objective (--model) and its parameters'
EVALUATION = 'evaluation'
RERUN = 're-runs on new dumps (see README "Re-running on new dumps")'

# How to read and split the ratings: the trainer's and the tuner's.
INPUT_OPTIONS: tuple[Option, ...] = (
    Option('data_type', 'ratings: lines of user, item, rating[, ignored columns]. '
           'web_views: CSV with a header naming clientId, contentId, timeOnPage; time on '
           'page is summed per (user, item).', DATA, default='ratings', choices=DATA_TYPES),
    Option('delimiter', 'Field delimiter, one character; "\\t" or "tab" for a tab.', DATA,
           default_text='tab for ratings, comma for web_views'),
    Option('headers', 'Skip the first non-blank line of every input file (a header).',
           DATA, flag=True),
    Option('max_bad_fraction', 'Fail (and publish nothing) when more than this share of '
           'the non-blank lines are bad; bad lines are listed in OUTPUT/errors/.', DATA,
           type=float, default=0.001),
    Option('max_id_length', 'A user or item ID longer than this many characters makes its '
           'line bad (reason id_too_long): one garbage ID would otherwise widen every ID '
           'array.', DATA, type=int, default=DEFAULT_MAX_ID_LENGTH),
    Option('max_line_bytes', 'A line longer than this many bytes (without its line break) '
           'is bad (reason line_too_long) and is streamed past, never held in memory: a '
           'file without newlines cannot exhaust memory.', DATA, type=int,
           default=DEFAULT_MAX_LINE_BYTES, default_text=f'{DEFAULT_MAX_LINE_BYTES} (1 MiB)'),
    Option('max_abs_value', 'A rating (or time on page) whose absolute value is above this '
           'is bad (reason out_of_range), like a value that is not a finite number: one '
           'absurd value can collapse a model.', DATA, type=float,
           default=DEFAULT_MAX_ABS_VALUE),
    Option('test_fraction', 'Share of ratings held out for test RMSE, chosen by a stable '
           'hash of (user, item, --split_seed).', DATA, type=float, default=0.1),
    Option('split_seed', 'Seed of the train/test split.', DATA, type=int, default=0),
)
_INPUT = {o.name: o for o in INPUT_OPTIONS}

TRAIN_OPTIONS: tuple[Option, ...] = (
    Option('input', 'Ratings file(s): a path or glob, local or gs://; .gz and other '
           'compressed files are read by their suffix.', DATA,
           aliases=('--train-files', '--train_files')),
    Option('output', 'Folder (local or gs://) for model/, metrics.json, errors/ and '
           '_SUCCESS.', DATA, aliases=('--job-dir', '--job_dir'),
           default_text='a new ./output/run-<timestamp> folder'),
    *INPUT_OPTIONS,
    Option('overwrite', 'Replace a model already published at --output (otherwise the run '
           'refuses to start).', DATA, flag=True),
    Option('vocabulary', 'How IDs are numbered: local (every distinct ID of a side in one '
           'set on one worker) or distributed (by ranges of the sorted order, so no worker '
           'holds every ID until the model files are written; slower on one machine). The '
           'model files are identical.', DATA, default='local', choices=VOCABULARIES),
    *(o for o in PARAMETERS if o.cli),
    Option('block_size', 'Users (or items) per block: the unit of parallel work and of '
           'memory per solve; lower it to spread a half-step over more workers.', MODEL,
           type=int, default=DEFAULT_BLOCK_SIZE),
    Option('exchange', 'How a half-step gets the other side\'s factors: broadcast (the '
           'whole matrix to every worker, a side input), routed (each block receives only '
           'the rows its ratings refer to, by a shuffle, as Spark ALS does), or auto (per '
           'side at run time: routed above --max_broadcast_mb). Results are '
           'bit-identical.', MODEL, choices=EXCHANGES,
           default_text='auto on Dataflow, broadcast elsewhere (routing costs a shuffle '
                        'per half-step)'),
    Option('max_broadcast_mb', '--exchange auto: the largest factor matrix (rows x columns '
           'x 4 bytes, in MiB) still broadcast.', MODEL, type=float,
           default=DEFAULT_MAX_BROADCAST_MB,
           default_text=f'{DEFAULT_MAX_BROADCAST_MB} (for 4 GB per worker process)'),
    Option('test_input', 'Held-out ratings file(s) (same formats and bad-line rules as '
           '--input) to evaluate on instead of the hashed split; all of --input then '
           'trains. Pairs whose user or item is not in --input count as cold start.',
           EVALUATION),
    Option('rank_k', 'K of precision/recall/MAP/NDCG@K on the test pairs (0: no ranking '
           'metrics).', EVALUATION, type=int, default=10),
    Option('relevance_threshold', 'A test pair is relevant for the ranking metrics when '
           'its rating is at least this.', EVALUATION, type=float,
           default_text='0 (every test pair) for --model implicit and web_views, else the '
                        'mean training rating (on 1-5 stars: 4 and 5 are relevant)'),
    Option('model_root', 'Versioned model root (local or gs://): the run publishes to '
           'ROOT/versions/<version>/ and, when the gate passes, points ROOT/LATEST at it. '
           'Instead of --output.', RERUN),
    Option('previous_model', 'A model folder, or a model root (its LATEST), to warm start '
           'from by ID and to compare with on the same test pairs.', RERUN,
           default_text='with --model_root, ROOT/LATEST if any'),
    Option('no_warm_start', 'With --model_root: do not warm start from LATEST (still '
           'compare with it for the gate).', RERUN, flag=True),
    Option('max_regression', 'Promotion gate: when the new model is worse than the '
           'previous one by more than this (relative, e.g. 0.02 = 2%) on the same test '
           'pairs, publish the version but leave LATEST, and exit with code 3.', RERUN,
           type=float, default_text='no gate'),
    Option('gate_metric', 'The gate\'s metric: test RMSE, or NDCG@rank_k.', RERUN,
           choices=GATE_METRICS, default_text='rmse, ndcg for --model implicit'),
    Option('keep_versions', 'After a promotion, delete the oldest versions beyond the '
           'newest N (never the one LATEST names).', RERUN, type=int,
           default_text='keep all'),
    Option('tolerance', 'Stop early once the relative change of the training objective '
           'between iterations (between the iterations it is computed after, with '
           '--objective_every) falls below this; the rest of the (unrolled) iterations '
           'pass the factors through.', RERUN, type=float, default=0.0,
           default_text='0 (run every iteration)'),
    Option('objective_every', 'Compute the training objective and train RMSE of the '
           'convergence history after every N-th iteration and after the last (0: the '
           'last only). Each is a pass over every training rating that the solves do not '
           'need: the factors are the same for any N.', RERUN, type=int,
           default=1, default_text='1 (every iteration)'),
    Option('eval_every', 'Also record the test metrics every N iterations in the '
           'convergence history.', RERUN, type=int, default=0,
           default_text='0 (only at the end)'),
)
TRAIN = {o.name: o for o in TRAIN_OPTIONS}
# Groups appear in --help in this order, whatever the order of their options.
GROUPS = (DATA, MODEL, OBJECTIVE, EVALUATION, RERUN)


def add_train_arguments(parser) -> None:
    """WalsOptions' arguments: every option of TRAIN_OPTIONS, in its --help group."""
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    for option in TRAIN_OPTIONS:
        option.add_to(groups[option.group])


def add_input_options(group) -> None:
    """The options that say how to read and split the ratings, shared by the trainer
    and the tuner (python -m pipeline.tune): INPUT_OPTIONS."""
    for option in INPUT_OPTIONS:
        option.add_to(group)


START = '<!-- options table: generated by scripts/options_table.py --write -->'
END = '<!-- end of the options table -->'


def _cell(text: str) -> str:
    """Text as a Markdown table cell: no HTML tags, emphasis or column breaks."""
    return (text.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
            .replace('*', '\\*').replace('|', '\\|'))


def markdown_table() -> str:
    """docs/options.md's table of every option of the trainer (between START and END)."""
    rows = ['| option | default | meaning |', '| --- | --- | --- |']
    for option in TRAIN_OPTIONS:
        names = ', '.join(f'`{flag}`' for flag in option.flags)
        default = option.default_description()
        if default is None:
            default = 'off' if option.flag else '—'
        rows.append(f'| {names} | {_cell(default)} | {_cell(option.help)} |')
    return '\n'.join(rows)
