"""The hyperparameter search behind `python -m pipeline.tune`: Optuna (TPE, seeded)
asks for batches of trials, each batch runs as the elements of one Beam pipeline on
the chosen runner, and every trial trains wals_core's in-memory trainer on the
training pairs and is scored on a validation split carved out of them (the
trainer's test split is never used). Writes trials.csv and best.json, staged and
published with a _SUCCESS manifest as every output of this tool
(pipeline/store/output_guard.py)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import time
import warnings

import apache_beam as beam
import pandas as pd
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions
from apache_beam.pvalue import AsSingleton

from pipeline.errors import MarkedError
from pipeline.io.read import check_input_files
from pipeline.options import (DEFAULT_MAX_ABS_VALUE, DEFAULT_MAX_LINE_BYTES, ConfigError,
                              check_finite, check_input_limits, parse_delimiter)
from pipeline.strict_json import dumps
from pipeline.runners.factory import make_pipeline
from pipeline.store.output_guard import OutputGuard
from pipeline.store.publish import describe_inputs, discard, new_run_id, remove_tree
from pipeline.tuning.data import DataConfig, PrepareTuning, load_data
from pipeline.tuning.trials import (Range, TrialSettings, default_trial,
                                    metric_name, search_space, train_and_score)
from wals_core.defaults import PARAMETER
from wals_core.models import get_model
from wals_core.params import default_wt_type

log = logging.getLogger(__name__)

WORK = '_work'   # inside the staging folder: the prepared data and per-trial results


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    data: DataConfig
    settings: TrialSettings
    output: str
    trials: int
    parallel: int
    search_seed: int
    overwrite: bool
    delimiter_text: str | None   # as given, for the train command


def config_from_args(args: argparse.Namespace) -> TuneConfig:
    model = get_model(args.model)
    metric = args.metric or model.default_metric
    if metric == 'rmse' and not model.predicts_ratings:
        raise ConfigError(f'--metric rmse does not apply to --model {args.model} (its '
                          'predictions are preferences, not ratings): use --metric ndcg')
    # An option that the chosen mode would ignore is a mistake, as in the trainer.
    for name in ('wt_type', 'confidence'):
        if getattr(args, name) is not None and not model.uses(name):
            owners = ' or '.join(PARAMETER[name].models)
            raise ConfigError(f'--{name} is a parameter of --model {owners}: --model '
                              f'{args.model} would ignore it')
    check_finite(relevance_threshold=args.relevance_threshold)
    check_input_limits(args)
    checks = [
        (args.trials >= 1, '--trials must be at least 1'),
        (args.parallel is None or args.parallel >= 1, '--parallel must be at least 1'),
        (args.num_iters is None or args.num_iters >= 1, '--num_iters must be at least 1'),
        (0 <= args.test_fraction < 1, '--test_fraction must be in [0, 1)'),
        (0 < args.validation_fraction < 1, '--validation_fraction must be in (0, 1)'),
        (0 <= args.max_bad_fraction <= 1, '--max_bad_fraction must be in [0, 1]'),
        (args.sample_users is None or args.sample_users >= 1,
         '--sample_users must be at least 1'),
        (args.cg_steps >= 1, '--cg_steps must be at least 1'),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    data = DataConfig(args.input, parse_delimiter(args.delimiter, args.data_type),
                      args.headers, args.data_type, args.max_bad_fraction,
                      args.test_fraction, args.split_seed, args.validation_fraction,
                      args.sample_users, args.max_id_length, args.max_line_bytes,
                      args.max_abs_value)
    settings = TrialSettings(
        model=args.model, metric=metric,
        num_iters=args.num_iters or PARAMETER['num_iters'].default_for(args.model), seed=args.seed,
        wt_type=args.wt_type or default_wt_type(args.data_type),
        confidence=args.confidence or 'log',
        implicit_data=args.data_type == 'web_views',
        relevance_threshold=args.relevance_threshold,
        solver=args.solver, cg_steps=args.cg_steps)
    parallel = args.parallel or 2 * (os.cpu_count() or 1)
    return TuneConfig(data, settings, args.output.rstrip('/'), args.trials,
                      min(parallel, args.trials), args.search_seed, args.overwrite,
                      args.delimiter)


def train_command(config: TuneConfig, params: dict) -> str:
    """The trainer's command line for these parameters on the full data."""
    d, s = config.data, config.settings
    argv = ['python', '-m', 'pipeline.train', '--input', d.input, '--model', s.model,
            '--data_type', d.data_type]
    if config.delimiter_text is not None:
        argv += ['--delimiter', config.delimiter_text]
    if d.headers:
        argv.append('--headers')
    if d.max_line_bytes != DEFAULT_MAX_LINE_BYTES:
        argv += ['--max_line_bytes', str(d.max_line_bytes)]
    if d.max_abs_value != DEFAULT_MAX_ABS_VALUE:
        argv += ['--max_abs_value', repr(d.max_abs_value)]
    argv += ['--max_bad_fraction', repr(d.max_bad_fraction),
             '--test_fraction', repr(d.test_fraction), '--split_seed', str(d.split_seed),
             '--seed', str(s.seed), '--num_iters', str(s.num_iters)]
    for name, value in get_model(s.model).fixed_tune_options(s.wt_type, s.confidence).items():
        argv += [f'--{name}', value]
    if s.solver != 'exact':
        argv += ['--solver', s.solver, '--cg_steps', str(s.cg_steps)]
    for name, value in params.items():
        argv += [f'--{name}', str(value) if isinstance(value, int) else repr(float(value))]
    return shlex.join(argv)


def beam_options(beam_args: list[str], parallel: int) -> PipelineOptions:
    """The user's Beam options; with none, the DirectRunner over the cores.

    Threads, not processes: a batch's pipeline is short, and multi_processing pays
    for starting its workers and copying the data to each of them on every batch
    (MovieLens 100k, 2 loaded cores, 16 explicit trials in batches of 4: in_memory
    30 s, multi_threading 23 s, multi_processing 66 s; identical trials tables)."""
    options = PipelineOptions(beam_args)
    if not beam_args:
        direct = options.view_as(DirectOptions)
        if parallel > 1:
            direct.direct_running_mode = 'multi_threading'
            direct.direct_num_workers = min(parallel, os.cpu_count() or 1)
        else:
            direct.direct_running_mode = 'in_memory'
    return options


def _save_result(result: dict, folder: str) -> None:
    with FileSystems.create(f'{folder}/trial-{result["number"]:06d}.json') as f:
        f.write(dumps(result).encode('utf-8'))


def run_batch(trials: list[dict], data_path: str, settings: TrialSettings, folder: str,
              options: PipelineOptions) -> list[dict]:
    """Runs the trials ({'number', 'params'}) as the elements of one Beam pipeline;
    returns their results in trial-number order."""
    with make_pipeline(options) as p:
        data = p | 'Data' >> beam.Create([data_path]) | 'Load' >> beam.Map(load_data)
        _ = (p | 'Trials' >> beam.Create(trials)
             | 'TrainAndScore' >> beam.Map(train_and_score, AsSingleton(data), settings)
             | 'Save' >> beam.Map(_save_result, folder))
    results = []
    for t in sorted(trials, key=lambda t: t['number']):
        with FileSystems.open(f'{folder}/trial-{t["number"]:06d}.json') as f:
            results.append(json.loads(f.read()))
    return results


def _distributions(space: dict[str, Range]):
    # optuna (the `tune` extra) is imported only in the launcher's functions: workers
    # import this module for the trial steps and do not have it.
    import optuna
    return {name: (optuna.distributions.IntDistribution(int(r.low), int(r.high), log=True)
                   if r.integer else
                   optuna.distributions.FloatDistribution(r.low, r.high, log=True))
            for name, r in space.items()}


def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path) as f:
        f.write(text.encode('utf-8'))


def run(config: TuneConfig, beam_args: list[str]) -> dict:
    """The whole search; returns the best.json content. Refused before any work
    (OutputRefused) when --output is a file, cannot be written, overlaps --input, or
    holds anything but an earlier search's results (or those without --overwrite)."""
    started = time.time()
    check_input_files(config.data.input)
    guard = OutputGuard(config.output, 'tuning', overwrite=config.overwrite)
    guard.check_target()
    guard.check_reads([('--input', config.data.input)])
    run_id = new_run_id()
    staging = guard.start(run_id)
    try:
        summary = _search(config, beam_args, staging, started)
        guard.publish(staging, {
            'kind': 'tuning', 'run_id': run_id, 'inputs': describe_inputs(config.data.input),
            'parameters': {k: summary[k] for k in ('model', 'metric', 'fixed', 'trials',
                                                    'search_seed')},
            'counts': summary['data']})
        return summary
    except BaseException:
        discard(staging)
        raise
    finally:
        guard.close()


def _search(config: TuneConfig, beam_args: list[str], staging: str, started: float) -> dict:
    """The search, its trials.csv and best.json written into staging."""
    import optuna
    work = f'{staging}/{WORK}'
    data_path = f'{work}/data.npz'
    options = beam_options(beam_args, config.parallel)
    s = config.settings
    try:
        with make_pipeline(beam_options(beam_args, 1) if not beam_args else options) as p:
            _ = p | 'Prepare' >> PrepareTuning(config.data, data_path)
        data = load_data(data_path)
        counts = data.describe()
        log.info('Tuning data: %s', json.dumps(counts))
        if not len(data.val_values):
            raise ConfigError('the validation split is empty (too few ratings, or raise '
                              '--validation_fraction)')

        space = search_space(s.model, s.wt_type, s.confidence)
        distributions = _distributions(space)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=config.search_seed, multivariate=True,
                                                 constant_liar=True)
        study = optuna.create_study(
            sampler=sampler, direction='minimize' if s.metric == 'rmse' else 'maximize')
        # Trial 0 is the mode's defaults: the best found is never worse than them.
        study.enqueue_trial(default_trial(s.model, space))
        name = metric_name(s.metric)
        rows, best = [], None
        while len(rows) < config.trials:
            size = min(config.parallel, config.trials - len(rows))
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', optuna.exceptions.ExperimentalWarning)
                asked = [study.ask(distributions) for _ in range(size)]
            batch = [{'number': t.number, 'params': {n: t.params[n] for n in space}}
                     for t in asked]
            results = run_batch(batch, data_path, s, f'{work}/trials', options)
            # Told in trial-number order: TPE's next proposals then depend only on the seed.
            for trial, spec, result in zip(asked, batch, results):
                if result['value'] is None:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    study.tell(trial, result['value'])
                    if best is None or _better(result['value'], best['value'], s.metric):
                        best = dict(result, params=spec['params'])
                rows.append({'number': spec['number'], **spec['params'],
                             name: result['value'],
                             'state': 'complete' if result['value'] is not None else 'failed',
                             'error': result['error'] or '', 'seconds': result['seconds']})
                log.info('trial %d/%d (number %d): %s -> %s = %s (%.1f s); best so far: '
                         '%s (number %s)', spec['number'] + 1, config.trials, spec['number'],
                         _short(spec['params']), name,
                         'failed: ' + result['error'] if result['value'] is None
                         else f'{result["value"]:.5f}', result['seconds'],
                         f'{best["value"]:.5f}' if best else 'none',
                         best['number'] if best else '-')
        table = pd.DataFrame(rows, columns=['number', *space, name, 'state', 'error', 'seconds'])
        _write_text(f'{staging}/trials.csv', table.to_csv(index=False))
        if best is None:
            raise AllTrialsFailed(rows)
        summary = {
            'model': s.model, 'metric': name, 'value': best['value'],
            'trial': best['number'], 'params': best['params'],
            'fixed': {'num_iters': s.num_iters, 'seed': s.seed,
                      **get_model(s.model).fixed_tune_options(s.wt_type, s.confidence),
                      # the default solver is left out (best.json as before it existed)
                      **({'solver': s.solver, 'cg_steps': s.cg_steps}
                         if s.solver != 'exact' else {})},
            'command': train_command(config, best['params']),
            'trials': config.trials, 'search_seed': config.search_seed,
            'data': counts,
            'seconds': round(time.time() - started, 3),
        }
        _write_text(f'{staging}/best.json', dumps(summary, indent=2) + '\n')
        return summary
    finally:
        remove_tree(work)   # the prepared data and per-trial results are not outputs


class AllTrialsFailed(MarkedError):
    """No trial gave a value: the message lists each trial's error."""

    def __init__(self, rows: list[dict]):
        lines = [f'every trial failed ({len(rows)} of {len(rows)}); nothing was '
                 'published. The trials and their errors:']
        for row in rows:
            error = ' '.join(str(row['error']).split())
            lines.append(f'  trial {row["number"]}: {error[:300]}')
        super().__init__('\n'.join(lines))


def _better(a: float, b: float, metric: str) -> bool:
    return a < b if metric == 'rmse' else a > b


def _short(params: dict) -> str:
    return ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                    for k, v in params.items())
