"""Beam's DaskRunner with a corrected ParDo translation (used for --runner DaskRunner).

Beam 2.77's apache_beam.runners.dask gives wrong results for this pipeline, for two
reasons in its transform_evaluator.py:

* ParDo.apply makes ONE `OneReceiver` per ParDo at translation time and hands it to
  every bundle (`map_partitions(apply_dofn_to_bundle, ..., tagged_receivers)`).
  `apply_dofn_to_bundle` appends the bundle's outputs to `tagged_receivers.values`
  and returns that whole list, never emptying it. Every bundle that runs in a worker
  process holding the same deserialized receiver (tasks shipped together, or the
  same task run again, see below) therefore re-emits the outputs of the bundles
  before it: elements are duplicated, differently in every run. (Outputs of
  finish_bundle are also dropped: the list is taken before it is called.)
* A ParDo's tagged outputs (with_outputs) come out mixed into its main output, as
  WindowedValues: every output PCollection of a multi-output ParDo got them all.
* A side input is read by `DaskBagWindowedIterator.__iter__`, `list(bag)`, that is
  `bag.compute()` inside the consuming task: the whole graph upstream of every side
  input is run again for every consuming bundle, recursively, so the bundles of
  early stages run many times in one process and the duplicates pile up. It is also
  where the time goes (thousands of bundle runs for one iteration).

Here every bundle gets its own receiver, the DoFn is copied per bundle (a DoFn
instance is never used by two threads at once), each output keeps its own tag,
finish_bundle outputs are kept, a GroupByKey keeps a bounded number of partitions,
and each side input is one dask dependency (its partitions concatenated, computed
once and passed to every consuming bundle). The runner also computes every leaf
of the graph, not only the last transform visited (Beam's runner would skip a
branch such as the bad-lines WriteToText).
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.common import (DoFnContext, DoFnInvoker, DoFnSignature,
                                        _OutputHandler)
from apache_beam.runners.dask import dask_runner as beam_dask
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.runners.dask.overrides import _GroupByKeyOnly, dask_overrides
from apache_beam.transforms.sideinputs import SideInputMap

def _concat_partitions(*parts) -> list:
    return [x for part in parts for x in part]


def _run_bundle(items, fn, label, window_fn, args, kwargs, views, *side_values):
    """One bundle (dask partition) of a ParDo: a fresh receiver and DoFn copy; the
    side inputs arrive computed (one list per side input)."""
    receivers = te.OneReceiver()
    side_inputs = [SideInputMap(view, options, [te.get_windowed_value(v, wfn) for v in values])
                   for (view, options, wfn), values in zip(views, side_values)]
    handler = _OutputHandler(
        window_fn=window_fn, main_receivers=receivers[None], tagged_receivers=receivers,
        per_element_output_counter=None, output_batch_converter=None,
        process_yields_batches=False, process_batch_yields_elements=False)
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(copy.deepcopy(fn)), handler, context=DoFnContext(label, state=None),
        side_inputs=side_inputs, input_args=list(args), input_kwargs=dict(kwargs),
        user_state_context=None, bundle_finalizer_param=beam.DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    # (tag, element): None for the main output. Beam's runner returns the tagged
    # outputs' WindowedValues mixed into the main output instead.
    return [(v.tag, v.value.value) if isinstance(v, pvalue.TaggedOutput) else (None, v.value)
            for v in receivers.values]


def _tag_is(tag, pair) -> bool:
    return pair[0] == tag


def _element(pair):
    return pair[1]


class _ParDo(te.DaskBagOp):
    """ParDo -> map_partitions(_run_bundle) with the side inputs as dependencies: a
    bag of (output tag, element), which the visitor splits by tag."""

    def apply(self, input_bag, side_inputs=None):
        import dask
        transform = self.transform
        args, kwargs = transform.raw_side_inputs
        main_input = next(iter(self.applied.main_inputs.values()))
        window_fn = main_input.windowing.windowfn if hasattr(main_input, 'windowing') else None
        views, values = [], []
        for view, options, bag, wfn in side_inputs or ():
            views.append((view, options, wfn))
            values.append(dask.delayed(_concat_partitions)(*bag.to_delayed(optimize_graph=False)))
        return input_bag.map(te.get_windowed_value, window_fn).map_partitions(
            _run_bundle, transform.fn, transform.label, window_fn, args, kwargs, views, *values)


# Most partitions a GroupByKey's output keeps (dask_npartitions overrides it).
MAX_GROUP_PARTITIONS = 8


def _group_key(item):
    return item[0]


def _group_value(item):
    k, v = item
    return k, [te.defenestrate(elm[1]) for elm in v]


class _GroupByKey(te.DaskBagOp):
    """GroupByKey with a bounded partition count. Beam's keeps its input's count,
    and a Flatten's input count is the sum of its inputs': the routed exchange's
    joins (Flatten + GroupByKey per half-step) then doubled the partitions every
    iteration, to ~1.8M tasks at 10 iterations. 8 partitions: a 4-iteration routed
    graph on MovieLens 100k has 4,836 tasks (12,991 with 32)."""

    def apply(self, input_bag, side_inputs=None):
        cap = self.bag_kwargs.get('npartitions') or MAX_GROUP_PARTITIONS
        return input_bag.groupby(_group_key, npartitions=min(input_bag.npartitions, cap)
                                 ).map(_group_value)


_TRANSLATIONS = {**te.TRANSLATIONS, beam.ParDo: _ParDo, _GroupByKeyOnly: _GroupByKey}


@dataclasses.dataclass
class _Visitor(PipelineVisitor):
    """AppliedPTransform -> dask Bag, and which transforms nobody consumes (leaves)."""
    bag_kwargs: dict
    bags: dict = dataclasses.field(default_factory=dict)
    consumed: set = dataclasses.field(default_factory=set)
    outputs: dict = dataclasses.field(default_factory=dict)   # (node, tag) -> bag

    def bag_of(self, value):
        """The bag of one PCollection: its tag's part of a ParDo's output."""
        return self.outputs.get((value.producer, value.tag), self.bags[value.producer])

    def visit_transform(self, node) -> None:
        op = _TRANSLATIONS.get(node.transform.__class__, te.NoOp)(node, bag_kwargs=self.bag_kwargs)
        kws = {'input_bag': None, 'side_inputs': None}
        inputs = list(node.inputs)
        if inputs:
            bags = []
            for value in inputs:
                if isinstance(value, pvalue.PBegin):
                    bags.append(None)
                if value.producer in self.bags:
                    bags.append(self.bag_of(value))
                    self.consumed.add(value.producer)
            kws['input_bag'] = bags[0] if len(bags) == 1 and not isinstance(op, te.Flatten) \
                else bags
        if node.side_inputs:
            kws['side_inputs'] = []
            for si in node.side_inputs:
                self.consumed.add(si.pvalue.producer)
                kws['side_inputs'].append((type(si), si._view_options(),
                                           self.bag_of(si.pvalue), si._window_mapping_fn))
        self.bags[node] = op.apply(**kws)
        if isinstance(op, _ParDo):
            for tag in node.outputs:
                self.outputs[(node, tag)] = self.bags[node].filter(
                    functools.partial(_tag_is, tag)).map(_element)

    def leaves(self) -> list:
        out = []
        for node, bag in self.bags.items():
            if node not in self.consumed:
                out.extend(b for b in (bag if isinstance(bag, list) else [bag])
                           if b is not None)
        return out


class DaskRunner(beam_dask.DaskRunner):
    """Beam's DaskRunner (same options: --dask_client_address ...) with the
    translation above."""

    def run_pipeline(self, pipeline, options):
        import dask
        import dask.distributed as ddist
        dask_options = options.view_as(beam_dask.DaskOptions).get_all_options(
            drop_default=True, current_only=True)
        bag_kwargs = beam_dask.DaskOptions._extract_bag_kwargs(dask_options)
        client = ddist.Client(**dask_options)
        pipeline.replace_all(dask_overrides())
        visitor = _Visitor(bag_kwargs)
        pipeline.visit(visitor)
        # Optimized once here; client.compute would optimize the whole graph again.
        futures = client.compute(list(dask.optimize(*visitor.leaves())), optimize_graph=False)
        return beam_dask.DaskRunnerResult(client, futures)


