"""The run report: the promotion gate's decision, report.json, convergence.png and the
short summary the launcher prints.

Everything here runs in the launcher after the pipeline has finished, on files of
the staging folder and of the previous model: the ratings added and removed are
computed in the launcher's memory (two int64 keys per rated pair of both models).
"""
from __future__ import annotations

import io
import math

import matplotlib
import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipeline.store.files import save_json
from pipeline.store.model_files import SEEN_FOLDER, ModelFiles, index_map

matplotlib.use('Agg')   # no display: the launcher may run on a server
from matplotlib.figure import Figure  # noqa: E402 - after the backend is chosen
from matplotlib.ticker import MaxNLocator  # noqa: E402

REPORT = 'report.json'
PLOT = 'convergence.png'
GATE_KEYS = {'rmse': ('test_rmse', 'test RMSE'), 'ndcg': ('ndcg_at_k', 'NDCG@k')}


def gate_decision(comparison: dict | None, metric: str, max_regression: float | None,
                  model_check: list[str] | None = None) -> dict:
    """Whether the new model may replace the previous one. Refused, whatever else,
    when the model failed its check (model_check: the problems found on its files,
    pipeline/store/model_check.py). rmse: refused when new > previous * (1 + X);
    ndcg: refused when new < previous * (1 - X), both on the same test pairs
    (metrics['comparison']). No gate (passed) without --max_regression or without a
    previous model; refused when there is nothing to compare on."""
    out = {'metric': metric, 'max_regression': max_regression}
    if model_check:
        return dict(out, passed=False, model_check=list(model_check),
                    reason=f'the model failed its check: {"; ".join(model_check)}')
    if max_regression is None:
        return dict(out, passed=True, reason='no gate (--max_regression not given)')
    if comparison is None:
        return dict(out, passed=True, reason='no previous model to compare with')
    key, label = GATE_KEYS[metric]
    new, old, pairs = comparison['new'].get(key), comparison['previous'].get(key), \
        comparison['pairs']
    out.update(pairs=pairs, new=new, previous=old)
    if metric == 'ndcg':
        out['ranking_users'] = comparison['new'].get('ranking_users')
    if not pairs or new is None or old is None or not (math.isfinite(new)
                                                       and math.isfinite(old)):
        return dict(out, passed=False,
                    reason=f'cannot compare {label}: {pairs} test pair(s) in common with the '
                           f'previous model (new {new}, previous {old})')
    if metric == 'rmse':
        limit = old * (1 + max_regression)
        passed = new <= limit
        rel = '<=' if passed else '>'
        formula = f'{old:.6f} * (1 + {max_regression:g}) = {limit:.6f}'
    else:
        limit = old * (1 - max_regression)
        passed = new >= limit
        rel = '>=' if passed else '<'
        formula = f'{old:.6f} * (1 - {max_regression:g}) = {limit:.6f}'
    where = f'on the same {pairs} test pairs'
    if metric == 'ndcg':
        where += f' ({out["ranking_users"]} users ranked)'
    return dict(out, passed=passed, limit=limit,
                reason=f'new {label} {new:.6f} {rel} previous {formula} {where}')


def load_seen_folder(folder: str, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of model/seen/part-*.npz of a folder not yet published (the
    staging folder: nothing to verify against yet)."""
    counts = np.zeros(num_users, np.int64)
    pieces = []
    for meta in FileSystems.match([f'{folder.rstrip("/")}/{SEEN_FOLDER}/part-*.npz'])[0] \
            .metadata_list:
        with FileSystems.open(meta.path) as f:
            data = f.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            start, indptr, indices = int(z['start']), z['indptr'], z['indices']
        counts[start:start + len(indptr) - 1] = np.diff(indptr)
        pieces.append((start, indices))
    indptr = np.zeros(num_users + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = (np.concatenate([p[1] for p in sorted(pieces, key=lambda p: p[0])])
               if pieces else np.zeros(0, np.int32))
    return indptr, indices.astype(np.int64)


def rating_changes(old_users, old_items, old_indptr, old_indices,
                   new_users, new_items, new_indptr, new_indices) -> dict:
    """Rated (user, item) pairs added, removed and kept between two models' seen
    pairs, compared by ID: each pair becomes one int64 key in the new numbering (a
    pair of an ID that left the model is removed)."""
    n_items = max(len(new_items), 1)
    ru = index_map(new_users, old_users)            # old user -> new row, or -1
    ci = index_map(new_items, old_items)
    old_rows = np.repeat(np.arange(len(old_users), dtype=np.int64), np.diff(old_indptr))
    r, c = ru[old_rows], ci[np.asarray(old_indices, np.int64)]
    both = (r >= 0) & (c >= 0)
    old_keys = r[both] * n_items + c[both]
    new_rows = np.repeat(np.arange(len(new_users), dtype=np.int64), np.diff(new_indptr))
    new_keys = new_rows * n_items + np.asarray(new_indices, np.int64)
    kept = int(np.isin(old_keys, new_keys, assume_unique=True).sum())
    return {'added': int(len(new_keys) - kept), 'removed': int(len(old_rows) - kept),
            'kept': kept}


def build_report(metrics: dict, staging: str, gate: dict, previous: ModelFiles | None,
                 output: str, version: str | None) -> dict:
    """report.json's content (see the README "Re-running on new dumps")."""
    changes = metrics.get('changes')
    report = {'output': output, 'version': version,
              'previous_model': previous.path if previous is not None else None,
              'iterations_run': metrics.get('iterations_run'),
              'num_iters': metrics.get('parameters', {}).get('num_iters'),
              'final_objective': metrics.get('final_objective'),
              'seconds': metrics.get('phase_seconds', {}).get('total'),
              'metrics': {k: metrics.get(k) for k in ('train_rmse', 'test_rmse',
                                                      'ndcg_at_k', 'precision_at_k')},
              'comparison': metrics.get('comparison'), 'gate': gate, 'changes': None}
    if previous is not None and changes is not None:
        new_users = _npy(f'{staging}/model/user.npy')
        new_items = _npy(f'{staging}/model/item.npy')
        new_indptr, new_indices = load_seen_folder(staging, len(new_users))
        old_indptr, old_indices = previous.load_seen()
        report['changes'] = {
            'users': {k: changes[f'users_{k}'] for k in ('added', 'removed', 'kept')},
            'items': {k: changes[f'items_{k}'] for k in ('added', 'removed', 'kept')},
            'ratings': rating_changes(previous.users, previous.items, old_indptr,
                                      old_indices, new_users, new_items, new_indptr,
                                      new_indices),
            'warm_started_items': changes.get('warm_started_items')}
    return report


def _npy(path: str) -> np.ndarray:
    with FileSystems.open(path) as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def write_report(folder: str, report: dict) -> None:
    save_json(f'{folder.rstrip("/")}/{REPORT}', report)


def plot_convergence(history: list[dict], path: str, title: str = '') -> None:
    """convergence.png: the training objective per iteration (log scale), train RMSE,
    and the test metrics of the --eval_every checkpoints when there are any."""
    solved = [h for h in history if h.get('objective') is not None]
    rmse = [h for h in solved if h.get('train_rmse') is not None]
    tests = [h for h in history if h.get('test')]
    panels = 1 + bool(rmse) + bool(tests)
    fig = Figure(figsize=(6, 2.4 * panels), dpi=100)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    its = [h['iteration'] for h in solved]
    objective = [h['objective'] for h in solved]
    ax.plot(its, objective, marker='o', ms=3)
    if objective and min(objective) > 0:
        ax.set_yscale('log')
    skipped = [h['iteration'] for h in solved if not h.get('solved', True)]
    if skipped:
        ax.axvline(skipped[0] - 0.5, color='grey', ls='--', lw=1)
        ax.text(skipped[0] - 0.4, ax.get_ylim()[1], ' converged (--tolerance)',
                va='top', fontsize=8, color='grey')
    ax.set_ylabel('objective')
    ax.set_title(title or 'Training convergence', fontsize=10)
    row = 1
    if rmse:
        axes[row].plot([h['iteration'] for h in rmse], [h['train_rmse'] for h in rmse],
                       marker='o', ms=3, color='tab:orange', label='train RMSE')
        axes[row].set_ylabel('train RMSE')
        row += 1
    if tests:
        ax = axes[row]
        x = [h['iteration'] for h in tests]
        for key, label in (('test_rmse', 'test RMSE'), ('ndcg_at_k', 'NDCG@k')):
            y = [h['test'].get(key) for h in tests]
            if any(v is not None for v in y):
                ax.plot(x, [np.nan if v is None else v for v in y], marker='s', ms=4,
                        label=label)
        ax.set_ylabel('test (checkpoints)')
        ax.legend(fontsize=8)
    axes[-1].set_xlabel('iteration')
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png', metadata={'Software': None})
    with FileSystems.create(path) as f:
        f.write(buf.getvalue())


def summary_lines(report: dict, promoted: str) -> list[str]:
    """The human summary the launcher prints at the end of a run."""
    lines = []
    ch = report.get('changes')
    if ch:
        for name in ('users', 'items', 'ratings'):
            c = ch[name]
            lines.append(f'{name.capitalize():8s} +{c["added"]} added, -{c["removed"]} '
                         f'removed, {c["kept"]} kept (against the previous model)')
    cmp_ = report.get('comparison')
    if cmp_:
        def fmt(side):
            parts = []
            for key, label in (('test_rmse', 'test RMSE'), ('ndcg_at_k', 'NDCG@k')):
                if side.get(key) is not None:
                    parts.append(f'{label} {side[key]:.4f}')
            return ', '.join(parts) or 'no metric'
        lines.append(f'Same {cmp_["pairs"]} test pairs: previous {fmt(cmp_["previous"])}; '
                     f'new {fmt(cmp_["new"])}')
    its, total = report.get('iterations_run'), report.get('num_iters')
    seconds = report.get('seconds')
    lines.append(f'Iterations run: {its} of {total}; time {seconds:.1f} s'
                 if seconds is not None else f'Iterations run: {its} of {total}')
    gate = report['gate']
    lines.append(f'Gate: {"passed" if gate["passed"] else "REFUSED"} - {gate["reason"]}')
    lines.append(promoted)
    return lines
