"""HELM's Runner with one change: all requests of a run go to FlexGen together.

HELM's Executor sends requests one at a time from a thread pool. FlexGenExecutor hands every
request of a scenario state whose deployment is a FlexGen one to FlexGenClient.make_requests in a
single call (the request layer groups and batches them); other deployments go HELM's usual way.
Everything else (run specs, scenarios, adapters, metrics, the run directory) is HELM's own:

    helm-run --runner-class-name flexgen.integrations.helm_runner.FlexGenRunner --run-entries ...

A scenario whose data cannot be downloaded ends the run with DatasetUnavailable, naming the
dataset and where HELM looks for it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List

from helm.benchmark.adaptation.scenario_state import ScenarioState
from helm.benchmark.executor import Executor, ExecutorError
from helm.benchmark.model_deployment_registry import get_model_deployment
from helm.benchmark.runner import Runner
from helm.benchmark.metrics.metric_service import MetricService
from helm.benchmark.window_services.tokenizer_service import TokenizerService
from helm.common.general import parallel_map
from helm.common.hierarchical_logger import hlog, hwarn
from helm.common.object_spec import create_object, get_class_by_name, inject_object_spec_args
from helm.common.request import GeneratedOutput

from .helm_client import FlexGenClient


class DatasetUnavailable(RuntimeError):
    """A scenario's data is not on disk and cannot be downloaded (message meant for the user)."""


class FlexGenExecutor(Executor):
    _clients: Dict[str, FlexGenClient] = {}

    def _flexgen_client(self, deployment_name: str):
        """The FlexGenClient of a deployment, or None when another client serves it."""
        if deployment_name in self._clients:
            return self._clients[deployment_name]
        d = get_model_deployment(deployment_name)
        if not issubclass(get_class_by_name(d.client_spec.class_name), FlexGenClient):
            return None
        spec = inject_object_spec_args(d.client_spec, constant_bindings={"cache_config": None,
                                                                         "model_name": d.model_name})
        self._clients[deployment_name] = client = create_object(spec)
        return client

    def execute(self, scenario_state: ScenarioState) -> ScenarioState:
        if self.execution_spec.dry_run:
            hlog("Skipped execution.")
            return scenario_state
        states = list(scenario_state.request_states)
        by_deployment: Dict[str, List[int]] = {}
        for i, s in enumerate(states):
            by_deployment.setdefault(s.request.model_deployment, []).append(i)
        for name, idx in by_deployment.items():
            client = self._flexgen_client(name)
            if client is None:     # not ours: HELM's per-request path
                done = parallel_map(self.process, [states[i] for i in idx], parallelism=self.execution_spec.parallelism)
                for i, s in zip(idx, done):
                    states[i] = s
                continue
            results = client.make_requests([states[i].request for i in idx])
            for i, result in zip(idx, results):
                states[i] = replace(states[i], result=_checked(result, states[i].request))
        hlog(f"Processed {len(states)} requests")
        return ScenarioState(adapter_spec=scenario_state.adapter_spec, request_states=states,
                             annotator_specs=scenario_state.annotator_specs)


def _checked(result, request):
    """As HELM's Executor.process: a non-fatal failure becomes an empty completion."""
    if result.success:
        return result
    if result.error_flags and not result.error_flags.is_fatal:
        hwarn(f"Non-fatal error treated as empty completion: {result.error}")
        return replace(result, completions=[GeneratedOutput(text="", logprob=0, tokens=[])])
    raise ExecutorError(f"{result.error} Request: {request}")


class FlexGenRunner(Runner):
    def __init__(self, execution_spec, *args, **kwargs):
        super().__init__(execution_spec, *args, **kwargs)
        self.executor = FlexGenExecutor(execution_spec)
        self.tokenizer_service = TokenizerService(self.executor.context)
        self.metric_service = MetricService(self.executor.context)

    def run_one(self, run_spec):
        try:
            return super().run_one(run_spec)
        except Exception as e:
            missing = dataset_download_failure(e)
            if missing is None:
                raise
            raise DatasetUnavailable(f"{run_spec.name}: {missing}") from e


def dataset_download_failure(exc: BaseException) -> str | None:
    """What a scenario was downloading when `exc` broke it, from the frames of HELM's downloader
    (ensure_file_downloaded) or of Hugging Face datasets' load_dataset; None if neither."""
    found = None
    e = exc
    while e is not None and found is None:
        tb = e.__traceback__
        while tb is not None:
            f = tb.tb_frame
            name, loc = f.f_code.co_name, f.f_locals
            if name == "ensure_file_downloaded" and "source_url" in loc:
                found = (f"the dataset {loc['source_url']} is not in {loc.get('target_path')} and cannot be "
                         f"downloaded here ({type(exc).__name__}: {exc}); put the file there to run offline")
                break
            if name == "load_dataset" and "datasets" in f.f_code.co_filename and "path" in loc:
                what = loc["path"] + (f" ({loc['name']})" if loc.get("name") else "")
                found = (f"the Hugging Face dataset {what} is not in the local datasets cache "
                         f"(HF_DATASETS_CACHE, cache_dir={loc.get('cache_dir')}) and cannot be downloaded here "
                         f"({type(exc).__name__}: {str(exc)[:200]})")
                break
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return found
