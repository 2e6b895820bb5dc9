#!/usr/bin/env python3
"""Prints what TensorBoard reads from one run folder's event files, as JSON on stdout.

    tensorboard_scalars.py RUN_DIR

Keys:
  scalars         [[tag, step, value], ...] in file order, from EventAccumulator (the reader
                  Keras users and most scripts use);
  server_scalars  [[tag, step, value], ...] sorted, from the data provider behind the
                  TensorBoard server's SCALARS tab (plugin_event_accumulator);
  hparams         {name: value} of the run's session_start_info, or null;
  hparams_tab     what the HPARAMS tab shows: its hyper-parameter and metric columns and, per
                  session, the hyper-parameters and each metric's last value.

Needs the `tensorboard` package (scripts/setup installs it into the torch environment).
"""

import json
import sys

from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.data import provider as provider_api
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context
from tensorboard.plugins.hparams import get_experiment, list_session_groups
from tensorboard.plugins.hparams import metadata as hparams_metadata
from google.protobuf import json_format


def accumulator_scalars(run_dir):
    acc = event_accumulator.EventAccumulator(
        run_dir, size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    scalars = []
    for tag in acc.Tags()[event_accumulator.SCALARS]:
        scalars += [[tag, e.step, e.value] for e in acc.Scalars(tag)]
    hparams = None
    try:
        content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    except KeyError:
        content = {}
    if hparams_metadata.SESSION_START_INFO_TAG in content:
        info = hparams_metadata.parse_session_start_info_plugin_data(
            content[hparams_metadata.SESSION_START_INFO_TAG]
        )
        hparams = {
            k: json_format.MessageToDict(v) for k, v in info.hparams.items()
        }
    return scalars, hparams


def server_view(run_dir):
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(run_dir)
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, run_dir)
    ctx = tb_context.RequestContext()
    runs = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars")
    data = provider.read_scalars(
        ctx,
        experiment_id="",
        plugin_name="scalars",
        downsample=10**9,
        run_tag_filter=provider_api.RunTagFilter(
            runs=list(runs), tags=[t for r in runs.values() for t in r]
        ),
    )
    scalars = sorted(
        [tag, d.step, d.value]
        for tags in data.values()
        for tag, points in tags.items()
        for d in points
    )
    tb = base_plugin.TBContext(data_provider=provider, logdir=run_dir)
    back = backend_context.Context(tb)
    exp = get_experiment.Handler(ctx, back, "", api_pb2.GetExperimentRequest()).run()
    groups = list_session_groups.Handler(
        ctx, back, "", api_pb2.ListSessionGroupsRequest(
            start_index=0, slice_size=100, allowed_statuses=range(4)
        )
    ).run()
    sessions = []
    for group in groups.session_groups:
        sessions.append({
            "hparams": {k: json_format.MessageToDict(v) for k, v in group.hparams.items()},
            "metrics": {
                m.name.tag: m.value for m in group.metric_values
            },
        })
    tab = {
        "hparams": [h.name for h in exp.hparam_infos],
        "metrics": [m.name.tag for m in exp.metric_infos],
        "sessions": sessions,
    }
    return scalars, tab


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: tensorboard_scalars.py RUN_DIR")
    run_dir = sys.argv[1]
    scalars, hparams = accumulator_scalars(run_dir)
    server_scalars, tab = server_view(run_dir)
    json.dump(
        {
            "scalars": scalars,
            "server_scalars": server_scalars,
            "hparams": hparams,
            "hparams_tab": tab,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
