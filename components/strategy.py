"""The tf.distribute strategy named in the spec's `training.strategy` block, and the cluster around it.

Every process of a distributed run executes the same trainer code (`components.trainer.run_fn`
under TFX, or `python -m components.trainer` on its own); what a process does is decided here
from the strategy type and, for the multi-process types, from the `TF_CONFIG` environment
variable that the platform sets in each replica.

Strategy types (the keys each accepts are `feature_spec.STRATEGY_OPTIONS`):

`default`
    One device; no distribution.

`mirrored` (`num_devices`)
    Synchronous data parallelism on one machine. With GPUs: `tf.distribute.MirroredStrategy`
    over all visible GPUs (or the first `num_devices`), gradients all-reduced with NCCL; the
    schedule's batch size is the global batch, split evenly across GPUs, so scale it with the
    GPU count to keep each GPU busy. Without GPUs, `num_devices` virtual CPU devices run the
    same code path, which is how the tests exercise it; they can only be created before
    TensorFlow initialises its runtime, i.e. in a fresh process.

`multi_worker` (`communication`: auto | ring | nccl)
    `tf.distribute.MultiWorkerMirroredStrategy`: synchronous data parallelism across machines,
    each worker with its local devices (GPUs or CPU). The cluster comes from `TF_CONFIG`
    (`{"cluster": {"chief": [...], "worker": [...]}, "task": {"type": ..., "index": ...}}`, or
    workers only, worker 0 then being the chief). Every step all-reduces gradients across all
    replicas, so each global batch is the schedule's batch size and the result matches
    single-worker training up to floating-point summation order. Input is sharded by DATA: each
    worker reads every file and keeps its share of each global batch (FILE sharding needs at
    least as many files as workers, and Transform writes few files for small data), so the
    trainer makes every worker read the examples in the same order. All workers must call
    `model.save`, because saving reads the replicated variables with collective ops that wait
    for every worker (a chief saving alone hangs until its peers' heartbeat times out); only
    the chief writes to the export directory, the others to a private temporary directory
    that is removed right after (`save_location`). The strategy must exist before TensorFlow
    starts its runtime, so it needs a process per replica: under the local runner, where
    Transform runs TensorFlow first in the same process, it fails with a message saying so
    (without TF_CONFIG it trains as one worker).

`parameter_server` (`examples_per_epoch`)
    `tf.distribute.ParameterServerStrategy`: asynchronous training with a coordinator (the
    `chief` task) that dispatches steps to `worker` tasks, with the variables held by `ps`
    tasks (each variable whole on one of them, round-robin). Worker and ps processes only run
    a `tf.distribute.Server` and block (`serve_if_cluster_server`); the coordinator trains
    through Keras `fit` with a repeated dataset and `steps_per_epoch` (an epoch is
    `examples_per_epoch` examples, counted from the training files when not given), each
    worker reading its own differently shuffled copy of the data, and evaluates each eval
    example exactly once (Keras' `pss_evaluation_shards`; it shards the eval data by FILE, so
    with one eval file one worker evaluates it all). Asynchronous updates make runs
    non-deterministic, so the spec refuses `deterministic: true` with it. Variable
    partitioning (`variable_partitioner`) is deliberately not offered: in TF 2.16 a model
    trained with partitioned variables exports a SavedModel whose restored functions no longer
    match their variables (measured: serving_tf_example fails with "Matrix size-incompatible:
    In[0]: [2,75], In[1]: [150,64]"; TensorFlow's ShardedVariable documents that such a
    SavedModel cannot be loaded with tf.saved_model.load, which the Evaluator and the local
    server use).

`tpu` (`tpu`)
    `tf.distribute.TPUStrategy` through `TPUClusterResolver(tpu=...)`: `"local"` on a Cloud TPU
    VM (Vertex AI TPU workers included), the TPU node's name otherwise, or empty when the
    platform sets the address in the environment (TPU_NAME). The schedule's batch size is the
    global batch across all cores: keep it a multiple of 8 times the core count. One process
    drives all cores, so there is no TF_CONFIG cluster. Not exercised by the tests (no TPU here).

A TF_CONFIG cluster of several tasks with a single-process type (default, mirrored, tpu) is
refused: every replica would train the whole model alone and race to write the same export.

On Kubernetes the platform writes TF_CONFIG: the Kubeflow Training Operator's `TFJob`
(replica types Chief, Worker, PS; see `deploy/tfjob.yaml`) and Vertex AI Training's CustomJob
(worker pool 0 is the chief, 1 the workers, 2 the parameter servers; TFX's Vertex Trainer
extension takes them in `ai_platform_training_args["worker_pool_specs"]`) both do.
"""

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Mapping, Optional

import tensorflow as tf

from components.feature_spec import STRATEGIES

# The task types of TF_CONFIG that this trainer knows how to play.
TRAINING_TASKS = ("chief", "worker")
SERVER_TASKS = ("worker", "ps")


@dataclasses.dataclass(frozen=True)
class ClusterRole:
    """This process's place in the cluster TF_CONFIG describes (one local process without it)."""
    cluster: Mapping[str, List[str]]
    task_type: Optional[str] = None
    task_index: int = 0

    @property
    def num_tasks(self) -> int:
        return sum(len(addresses) for addresses in self.cluster.values())

    @property
    def is_chief(self) -> bool:
        """The chief task, or worker 0 of a cluster without one (TensorFlow's own rule)."""
        if not self.cluster or self.task_type is None or self.task_type == "chief":
            return True
        return self.task_type == "worker" and self.task_index == 0 and "chief" not in self.cluster

    def describe(self) -> str:
        return f"{self.task_type}:{self.task_index}" if self.task_type else "local"


def cluster_role(environ: Mapping[str, str] = os.environ) -> ClusterRole:
    """Reads TF_CONFIG; raises ValueError naming what is wrong with it."""
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        return ClusterRole(cluster={})
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
    cluster = config.get("cluster") or {}
    task = config.get("task") or {}
    if not isinstance(cluster, dict) or not all(isinstance(v, list) for v in cluster.values()):
        raise ValueError(f"TF_CONFIG.cluster must map task types to address lists, got {cluster!r}")
    task_type, task_index = task.get("type"), int(task.get("index", 0))
    if cluster and task_type is None:
        raise ValueError("TF_CONFIG has a cluster but no task.type for this process")
    if task_type is not None and task_index >= len(cluster.get(task_type, [])):
        raise ValueError(f"TF_CONFIG task {task_type}:{task_index} is not in its cluster "
                         f"({ {k: len(v) for k, v in cluster.items()} })")
    return ClusterRole(cluster=cluster, task_type=task_type, task_index=task_index)


def make_strategy(config: Mapping[str, Any], role: Optional[ClusterRole] = None) -> tf.distribute.Strategy:
    """The strategy for this process; `config` is the spec's training.strategy block."""
    kind = config.get("type", "default")
    if kind not in STRATEGIES:
        raise ValueError(f"training.strategy.type: unknown strategy '{kind}' (one of {', '.join(STRATEGIES)})")
    role = role or cluster_role()
    _check_role(kind, role)
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return _mirrored(int(config.get("num_devices", 0)))
    if kind == "multi_worker":
        return _multi_worker(config.get("communication", "auto"))
    if kind == "parameter_server":
        return _parameter_server(role)
    return _tpu(config.get("tpu", ""))


def _check_role(kind: str, role: ClusterRole) -> None:
    """Refuses cluster shapes the strategy cannot use, before any TensorFlow runtime starts."""
    if role.task_type == "evaluator":
        raise ValueError("TF_CONFIG task type 'evaluator' is not supported: the pipeline's Evaluator "
                         "component evaluates the exported model")
    if kind in ("default", "mirrored", "tpu") and role.num_tasks > 1:
        raise ValueError(f"training.strategy.type: '{kind}' trains in one process, but TF_CONFIG describes "
                         f"{role.num_tasks} tasks ({', '.join(sorted(role.cluster))}); every replica would "
                         "train the whole model on its own. Use multi_worker or parameter_server.")
    if kind == "multi_worker" and "ps" in role.cluster:
        raise ValueError("training.strategy.type: 'multi_worker' has no parameter servers, but TF_CONFIG's "
                         "cluster lists 'ps' tasks: use parameter_server, or drop the ps replicas")
    if kind == "parameter_server":
        missing = [t for t in ("chief", "worker", "ps") if not role.cluster.get(t)]
        if missing:
            raise ValueError("training.strategy.type: 'parameter_server' needs TF_CONFIG with a cluster of "
                             f"chief (the coordinator), worker and ps tasks; missing: {', '.join(missing)}")
    if kind == "multi_worker" and not role.cluster:
        logging.warning("training.strategy.type multi_worker without TF_CONFIG: training as a single worker")


def _mirrored(num_devices: int) -> tf.distribute.Strategy:
    """All local GPUs (or the first `num_devices`); without GPUs, `num_devices` virtual CPU devices."""
    gpus = tf.config.list_physical_devices("GPU")  # physical: listing logical ones starts the runtime
    if gpus:
        count = min(num_devices, len(gpus)) if num_devices else len(gpus)
        return tf.distribute.MirroredStrategy(devices=[f"/gpu:{i}" for i in range(count)])
    num_devices = max(num_devices, 1)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices)
    except RuntimeError:
        # The runtime is already initialised (e.g. by Transform in the same process): use what exists.
        logging.warning("virtual CPU devices already fixed; mirrored strategy uses the existing ones")
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)


def _multi_worker(communication: str) -> tf.distribute.Strategy:
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation[communication.upper()])
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as e:
        raise RuntimeError(
            "training.strategy.type multi_worker: MultiWorkerMirroredStrategy must be created before "
            "TensorFlow starts its runtime in this process, so it cannot follow Transform inside one "
            "process (the local runner). Run the Trainer on a platform that starts one process per "
            f"replica with TF_CONFIG (Vertex AI Training, a Kubeflow TFJob). TensorFlow said: {e}") from e


def _parameter_server(role: ClusterRole) -> tf.distribute.Strategy:
    if role.task_type != "chief":
        raise ValueError(f"parameter_server: task {role.describe()} is a server; "
                         "call serve_if_cluster_server before make_strategy")
    return tf.distribute.ParameterServerStrategy(tf.distribute.cluster_resolver.TFConfigClusterResolver())


def _tpu(tpu: str) -> tf.distribute.Strategy:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def serve_if_cluster_server(config: Mapping[str, Any], role: Optional[ClusterRole] = None) -> None:
    """On a parameter-server cluster's worker and ps tasks: run the gRPC server and never return.

    The coordinator (chief) sends them work and variables; they hold no training code of
    their own. The platform stops them once the chief has finished (a TFJob's default success
    policy, a Vertex AI CustomJob's worker pool 0).
    """
    role = role or cluster_role()
    if config.get("type") != "parameter_server" or role.task_type not in SERVER_TASKS:
        return
    _check_role("parameter_server", role)
    server = tf.distribute.Server(tf.train.ClusterSpec(dict(role.cluster)), job_name=role.task_type,
                                  task_index=role.task_index, protocol="grpc", start=True)
    logging.info("parameter_server: %s serving at %s", role.describe(), server.target)
    server.join()


def is_parameter_server(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.ParameterServerStrategy)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Several processes in one synchronous step (MultiWorkerMirroredStrategy with >1 worker)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return sum(len(cluster.get(t, ())) for t in TRAINING_TASKS) > 1


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs (export, metrics file)."""
    if is_multi_worker(strategy):
        resolver = strategy.cluster_resolver
        return ClusterRole(resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id or 0).is_chief
    return cluster_role().is_chief


@contextlib.contextmanager
def save_location(strategy: tf.distribute.Strategy, export_dir: str) -> Iterator[str]:
    """Where this process saves the model: the export directory on the chief, a temporary one elsewhere.

    Under MultiWorkerMirroredStrategy every worker must save (the save reads the replicated
    variables through collective ops that wait for all workers), but only the chief's copy is
    the model. The others write to a private local directory that is removed when the block
    ends, so nothing of theirs is left beside the chief's export, even on shared storage.
    """
    if is_chief(strategy):
        yield export_dir
        return
    role = cluster_role()
    scratch = tempfile.mkdtemp(prefix=f"skewless-{role.task_type}{role.task_index}-save-")
    try:
        yield os.path.join(scratch, "model")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def describe(strategy: tf.distribute.Strategy) -> Dict[str, Any]:
    """What ran, for logs and the metrics file."""
    return {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync),
            "task": cluster_role().describe()}
