"""python -m pipeline.recommend (wals recommend): recommendations from a trained model.

Batch (a Beam pipeline, DirectRunner by default): the top --top_k items for every
user (or the --users listed), or with --similar_items the most cosine-similar
items of every item (or the --items listed), written as sharded files under
--output, staged and published with a _SUCCESS manifest as the trainer does.
One user (no Beam): --user ID, or --new_user_ratings FILE for a user who was not
in training (folded in), printed to the terminal.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from pipeline.cli.common import prog, run_command, setup_logging, split_beam_args
from pipeline.errors import InputError
from pipeline.io.id_lists import read_new_user_ratings
from pipeline.options import DEFAULT_MAX_ABS_VALUE, ConfigError, WalsOptions
from pipeline.runners import cloud_launch
from pipeline.runners.factory import make_pipeline
from pipeline.serving import batch as rb
from pipeline.serving.batch_run import prepare, run_batch
from pipeline.store.model_root import holding
from pipeline.serving.recommender import NonFiniteScores
from pipeline.store.publish import OutputExists, UntrustedModel, new_run_id, staging_path
from pipeline.strict_json import dumps

log = logging.getLogger(__name__)

EPILOG = """Scores: wals and implicit models score an item by u·v (the dot product of the
user's and the item's factors); explicit models report the predicted rating
mu + b_u + c_j + u·v and rank by u·v + c_j (mu and b_u are the same for every item of
a user, so the order is the same). Similar items: the cosine of the item factors
(explicit: without the bias). Ties go to the smaller item row number.
Seen items: model/seen/ records every (user, item) pair of the training --input
(train and hashed test pairs; 4 bytes per rating + 8 per user); they are left out
unless --include_seen. A user with fewer unseen items than --top_k gets fewer.
Outputs (batch): OUTPUT/recommendations-NNNNN-of-MMMMM.jsonl (one shard per row
block of the model; similar_items-... with --similar_items, slices of 8192 items),
each line {"user": ID, "items": [{"item": ID, "score": s}, ...]} in rank order
({"item": ID, "similar": [...]} for similar items); --format csv: rows
user,rank,item,score with a header per shard; --format parquet: the same long
table (user, rank int32 from 1, item, score float32). IDs keep the model's type
(int or string). Scores are float32, printed with '%.9g' (exact). Unknown
--users/--items IDs are counted in metrics.json and listed in
OUTPUT/errors/unknown_{users,items}-00000-of-00001.txt. The run works in
OUTPUT.tmp-<run id> and publishes OUTPUT/_SUCCESS last.
Any other option is a Beam pipeline option, e.g. --direct_running_mode
multi_processing --direct_num_workers 2; on Dataflow: ./run_dataflow.sh recommend ...
Examples:
  python -m pipeline.recommend --model output/run-1 --output output/recs
  python -m pipeline.recommend --model output/run-1 --output output/sim --similar_items
  python -m pipeline.recommend --model output/run-1 --user 196
  python -m pipeline.recommend --model output/run-1 --new_user_ratings me.tsv --json"""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be 1 or more, got {value}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog('recommend'), description=__doc__.split('\n\n')[1],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', required=True,
                        help='A published model folder (local or gs://), as written by '
                             'python -m pipeline.cli.train; refused unless its _SUCCESS '
                             'manifest matches every file.')
    parser.add_argument('--top_k', '--top-k', dest='top_k', type=positive_int, default=10,
                        help='Items per user (or per item). Default: 10.')
    parser.add_argument('--include_seen', '--include-seen', dest='include_seen',
                        action='store_true',
                        help='Also recommend items the user rated in the training input.')
    batch = parser.add_argument_group('batch (a Beam pipeline)')
    batch.add_argument('--output', help='Folder (local or gs://) for the shards, '
                                        'metrics.json, errors/ and _SUCCESS.')
    batch.add_argument('--format', dest='fmt', choices=rb.FORMATS, default='jsonl',
                       help='jsonl (default), csv or parquet.')
    batch.add_argument('--users', dest='users_file',
                       help='Only the users in this file (one ID per line).')
    batch.add_argument('--similar_items', '--similar-items', dest='similar_items',
                       action='store_true',
                       help='The top-K most cosine-similar items of every item instead.')
    batch.add_argument('--items', dest='items_file',
                       help='With --similar_items: only the items in this file.')
    batch.add_argument('--overwrite', action='store_true',
                       help='Replace what is already at --output.')
    batch.add_argument('--kernel_threads', type=positive_int, default=None,
                       help='Threads of the top-K kernel per work unit (default: the '
                            "process's CPUs; results do not depend on it).")
    one = parser.add_argument_group('one user (no Beam)')
    one.add_argument('--user', help='Print the recommendations of this user ID.')
    one.add_argument('--new_user_ratings', '--new-user-ratings', dest='new_user_ratings',
                     help='Fold in a new user from this file (lines: item<TAB or '
                          'comma>rating) and print their recommendations.')
    one.add_argument('--json', action='store_true',
                     help='Print JSON instead of "item<TAB>score" lines.')


# ---- one user --------------------------------------------------------------------

def run_one_user(args) -> list[tuple]:
    """Recommendations for --user or --new_user_ratings through the Python API."""
    from pipeline.serving.recommender import Recommender
    t0 = time.perf_counter()
    with holding(args.model, new_run_id()) as folder:   # a root's version: not pruned meanwhile
        rec = Recommender.load(folder)
    log.info('Loaded %s (%d users x %d items, %s model) in %.2f s', args.model,
             len(rec.users), len(rec.items), rec.params.model, time.perf_counter() - t0)
    t1 = time.perf_counter()
    if args.new_user_ratings:
        # The model's own limit: a rating its training input would have refused as
        # out_of_range is refused here too.
        limit = rec.files.manifest.get('parameters', {}).get('max_abs_value',
                                                             DEFAULT_MAX_ABS_VALUE)
        ratings = read_new_user_ratings(args.new_user_ratings, limit)
        known = []
        for item, rating in ratings:
            try:
                rec.item_index(item)
                known.append((item, rating))
            except KeyError:
                log.warning('new user ratings: item %s is not in the model (skipped)', item)
        if not known:
            raise ConfigError(f'no item of {args.new_user_ratings} is in the model')
        try:
            result = rec.recommend_new_user(known, k=args.top_k,
                                            exclude_rated=not args.include_seen)
        except NonFiniteScores as e:
            raise ConfigError(f'--new_user_ratings {args.new_user_ratings}: {e}') from None
    else:
        try:
            args.user = rec.user_id(rec.user_index(args.user))   # the model's ID type
        except KeyError:
            raise ConfigError(f'user {args.user} is not in the model (a new user: give '
                              'their ratings with --new_user_ratings)') from None
        try:
            result = rec.recommend(args.user, k=args.top_k,
                                   exclude_seen=not args.include_seen)
        except NonFiniteScores as e:
            raise InputError(f'{args.model}, user {args.user}: {e}') from None
    log.info('Recommended in %.3f s', time.perf_counter() - t1)
    return result


def print_one_user(args, result) -> None:
    if args.json:
        who = {'user': args.user} if args.user is not None else {'new_user': True}
        print(dumps({**who, 'items': [{'item': i, 'score': float('%.9g' % np.float32(s))}
                                      for i, s in result]}))
    else:
        for item, score in result:
            print(f'{item}\t{score:.9g}')


# ---- Dataflow (./run_dataflow.sh recommend ...) -----------------------------------

DATAFLOW_EPILOG = """Defaults (each can be overridden by giving the option):
  --job_name wals-recommend-<UTC timestamp>  --output gs://B/recommendations/<job name>
  --temp_location gs://B/tmp  --staging_location gs://B/staging
  --setup_file <this checkout>/setup.py  --machine_type n1-highmem-4
  --max_num_workers 4
Every worker process loads the model once (factors and IDs: about
(users + items) x (latent_factors + 1) x 4 bytes plus the ID arrays).
Examples:
  ./run_dataflow.sh recommend --project P --region us-central1 --bucket gs://B \\
      --model gs://B/models/wals-20260101-000000 --dry_run
  ./run_dataflow.sh recommend --project P --region us-central1 --bucket gs://B \\
      --model gs://B/models/M --output gs://B/recs/M --format parquet"""


def launch_dataflow(argv: list[str]) -> int:
    """./run_dataflow.sh recommend: the batch pipeline on Dataflow. Fills in the cloud
    defaults as the trainer's launcher does; --dry_run builds the job without reading
    the model or touching any Cloud resource; --template_location stages it; otherwise
    this process runs the job, waits and publishes."""
    parser = build_parser()
    parser.prog = './run_dataflow.sh recommend'
    parser.description = 'Batch recommendations on Google Cloud Dataflow.'
    parser.epilog = DATAFLOW_EPILOG
    cloud_launch.add_cloud_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    try:
        extra = split_beam_args(rest, not_here=trainer_options())
        if args.user is not None or args.new_user_ratings:
            raise ConfigError('--user / --new_user_ratings run locally: '
                              'python -m pipeline.recommend --model ... --user ID')
        cloud = cloud_launch.cloud_options(args, extra, job_prefix='wals-recommend')
        args.output = (args.output or
                       f'{cloud.bucket}/recommendations/{cloud.job_name}').rstrip('/')
        for flag in ('model', 'output'):
            if not getattr(args, flag).startswith('gs://'):
                raise ConfigError(f'--{flag} must be a gs:// path: Dataflow workers cannot '
                                  f'see local files (got {getattr(args, flag)!r})')
        added = list(cloud.extra)
        if not cloud.worker.machine_type:
            added.append(f'--machine_type={cloud_launch.DEFAULT_MACHINE_TYPE}')
        if not cloud.worker.max_num_workers:
            added.append(f'--max_num_workers={cloud_launch.MAX_WORKERS_UNKNOWN_INPUT}')
        template = cloud.given.view_as(GoogleCloudOptions).template_location
        if args.dry_run or template:
            prepare(args, verify=False)
    except ConfigError as e:
        parser.error(str(e))
    options = extra + added
    summary = {'job_name': cloud.job_name, 'project': args.project, 'region': args.region,
               'model': args.model, 'output': args.output, 'format': args.fmt,
               'similar_items': args.similar_items, 'top_k': args.top_k,
               'success_marker': f'{args.output}/_SUCCESS', 'beam_args': options}
    print(f'Dataflow job {cloud.job_name} (project {args.project}, region {args.region}): '
          f'{"similar items" if args.similar_items else "recommendations"} from '
          f'{args.model} to {args.output}', flush=True)
    if not (args.dry_run or template):
        print('Submitting. Keep this command running: it waits for the job, then '
              'publishes the shards.', flush=True)
        return main([*argv_without_cloud(argv), '--output', args.output, *added])
    # Built, not run: the model is read by the workers when the job runs (a
    # template's manifest is the one found then).
    spec = rb.BatchSpec(model=args.model.rstrip('/'), manifest_sha256=None,
                        staging=staging_path(args.output, new_run_id()),
                        similar=args.similar_items, top_k=args.top_k,
                        include_seen=args.include_seen, fmt=args.fmt,
                        selected=False, kernel_threads=args.kernel_threads)
    pipeline = make_pipeline(PipelineOptions(
        options + (['--dry_run=True'] if args.dry_run else [])))
    rb.build_pipeline(pipeline, spec)
    result = pipeline.run()
    if args.dry_run:
        staged = len(result.job.proto_pipeline.SerializeToString())
        print(f'Dry run: built job {cloud.job_name} ({staged:,} bytes of pipeline graph); '
              'nothing was submitted.')
        print(dumps(summary, indent=2))
    else:
        print(f'Wrote the job description to {template}; nothing was run.')
    return 0


def argv_without_cloud(argv: list[str]) -> list[str]:
    """argv minus the launcher's own --bucket and --dry_run (and --output, which the
    caller passes filled in); --project and --region go on as Beam options."""
    drop = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    drop.add_argument('--bucket')
    drop.add_argument('--output')
    drop.add_argument('--dry_run', '--dry-run', nargs='?')
    _, kept = drop.parse_known_args(argv)
    return kept


# ---- main ------------------------------------------------------------------------

def _batch(args, extra: list[str]) -> int:
    metrics = run_batch(args, PipelineOptions(extra))
    print(dumps(metrics['counts'], indent=2))
    print(f'{metrics["kind"]} written to {args.output.rstrip("/")}/ '
          f'({metrics["phase_seconds"]["total"]:.1f} s)')
    return 0


def _one_user(args) -> int:
    print_one_user(args, run_one_user(args))
    return 0


def trainer_options() -> argparse.ArgumentParser:
    """The trainer's options: a mistake here, not something to pass on to Beam."""
    trainer = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    WalsOptions._add_argparse_args(trainer)
    return trainer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    one_user = args.user is not None or args.new_user_ratings is not None
    try:
        if args.user is not None and args.new_user_ratings:
            raise ConfigError('--user and --new_user_ratings go separately')
        extra = split_beam_args(rest, not_here=trainer_options())
        if one_user and (extra or args.output or args.similar_items or args.users_file):
            raise ConfigError('--user / --new_user_ratings print one user\'s list: no '
                              '--output, --users, --similar_items or Beam options')
    except ConfigError as e:
        parser.error(str(e))
    body = (lambda: _one_user(args)) if one_user else (lambda: _batch(args, extra))
    return run_command(body, parser, refused=(OutputExists,),
                       failed=(UntrustedModel, InputError),
                       after_failure=f'\nNothing was written to '
                                     f'{args.output or "the terminal"}.')


if __name__ == '__main__':
    sys.exit(main())
