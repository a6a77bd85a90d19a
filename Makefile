# skewless — the commands a person runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SPEC ?= configs/taxi.yaml
ENV ?= configs/local.yaml
# Keras 3 breaks TFX 1.16's Keras paths; quiet TF's C++ start-up chatter.
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONWARNINGS := ignore

KF_ENV ?= configs/kubeflow.yaml
EXPERIMENT ?= skewless
KF_ARGS = --spec $(SPEC) --env $(KF_ENV) $(if $(IMAGE),--image $(IMAGE)) $(if $(BEAM_PROFILE),--beam_profile $(BEAM_PROFILE))

.PHONY: help setup lock test test-fast run retrain image-train compile submit schedule schema schema-json data promote rollback parity serve monitor ab-report export-span demo-feedback demo-drift retention batch-predict bench-pipeline bench-serving bench-proxy bench-scale clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/bin/uv:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet uv

setup: $(VENV)/bin/uv ## create .venv and install the pinned stack (requirements/lock.txt) with uv
	$(VENV)/bin/uv pip sync --compile-bytecode --python $(PY) requirements/lock.txt
	$(VENV)/bin/uv pip install --python $(PY) --no-deps uv -e .

RESOLVE = $(VENV)/bin/uv pip compile --python-version 3.10 --python-platform x86_64-manylinux_2_36 --no-header --quiet

lock: $(VENV)/bin/uv ## re-resolve requirements/*.in into requirements/lock.txt (Python 3.10 rules, glibc 2.36)
	@mkdir -p build
	$(RESOLVE) requirements/lock.in -o build/lock-pass1.txt
	grep -v -E '^(protobuf|kfp|kfp-pipeline-spec|kfp-server-api)==' build/lock-pass1.txt > build/lock-constraints.txt
	$(RESOLVE) requirements/protobuf4.in -c build/lock-constraints.txt \
	  --override requirements/overrides.txt -o requirements/lock.txt

test: ## the whole suite (slow end-to-end runs included)
	$(PY) -m pytest -n 2 --dist loadgroup --durations=20 tests

test-fast: ## the suite without the slow end-to-end pipeline runs
	$(PY) -m pytest -n 2 -m "not slow" tests

retrain: ## a run over the rolling window of spans, refused (exit 3) unless the newest span is new: make retrain [SPEC=]
	$(PY) -m pipelines.local_runner --spec $(SPEC) --env $(ENV) --require_new_span

run: ## run the pipeline on $(SPEC); writes build/run_summary.json and build/reports/*.html [BEAM_PROFILE=direct_multi_processing] [FORCE=1: even if nothing changed]
	$(PY) -m pipelines.local_runner --spec $(SPEC) --env $(ENV) $(if $(BEAM_PROFILE),--beam_profile $(BEAM_PROFILE)) $(if $(FORCE),--force)

image-train: ## docker build -f Dockerfile.train: make image-train IMAGE=<registry>/skewless-train:<tag>
	$(if $(IMAGE),,$(error IMAGE is required))
	docker build -f Dockerfile.train -t $(IMAGE) .

compile: ## KFP v2 pipeline spec to build/kubeflow/<name>_pipeline.yaml [IMAGE= BEAM_PROFILE= KF_ENV=]
	$(PY) -m pipelines.kubeflow_runner compile $(KF_ARGS)

submit: ## compile, upload, run on Kubeflow Pipelines: make submit KFP_HOST=http://host:8080 [EXPERIMENT=skewless]
	$(if $(KFP_HOST),,$(error KFP_HOST is required))
	$(PY) -m pipelines.kubeflow_runner submit --host $(KFP_HOST) --experiment $(EXPERIMENT) $(KF_ARGS)

schedule: ## continuous retraining: make schedule KFP_HOST=... CRON='0 0 3 * * *' [EXPERIMENT=]
	$(if $(and $(KFP_HOST),$(CRON)),,$(error KFP_HOST and CRON are required))
	$(PY) -m pipelines.kubeflow_runner schedule --host $(KFP_HOST) --cron '$(CRON)' --experiment $(EXPERIMENT) $(KF_ARGS)

data: ## write the CSVs of configs/synthetic_{multiclass,regression}.yaml under build/data/
	$(PY) tests/datasets.py

schema: ## infer the schema of $(SPEC)'s data and write it to the spec's schema path for review
	$(PY) -m pipelines.schema_tool --spec $(SPEC)

schema-json: ## write configs/spec.schema.json, the JSON Schema of a dataset spec (for editors validating YAML)
	$(PY) -m components.feature_spec $(if $(OUT),$(OUT))

promote: ## promote a pushed, blessed version: make promote VERSION=n [LABEL=stable|canary] [BASE_PATH=/models]
	$(PY) -m ops.release promote --version $(VERSION) --label $(or $(LABEL),stable) $(if $(SERVING_URL),--serving_url $(SERVING_URL)) $(if $(BASE_PATH),--serving_base_path $(BASE_PATH))

.PHONY: review
review: ## the release review page of a pushed version beside the stable one: make review VERSION=n; writes build/reports/review_<model>_v<n>.html
	$(if $(VERSION),,$(error VERSION is required))
	$(PY) -m ops.review --version $(VERSION) --model $(or $(MODEL),taxi) --spec $(SPEC) $(if $(LABEL),--label $(LABEL))

rollback: ## move a label back to the version it replaced: make rollback [LABEL=stable]
	$(PY) -m ops.release rollback --label $(or $(LABEL),stable) $(if $(SERVING_URL),--serving_url $(SERVING_URL)) $(if $(BASE_PATH),--serving_base_path $(BASE_PATH))

parity: ## the taxi eval split through training path, both signatures and REST; writes build/parity.json [VERSION=n]
	$(PY) -m ops.parity $(if $(VERSION),--version $(VERSION))

serve: ## TF-Serving twin (REST :8501, gRPC :8500) from build/model_repository/models.config, and the proxy on :8080 (reading the same repository)
	@config=build/model_repository/models.config; \
	if [ -f $$config ]; then source="--model_config_file $$config --model_config_file_poll_wait_seconds 2 --allow_version_labels_for_unavailable_models"; \
	else echo "no $$config yet (make promote VERSION=n writes it): serving the latest pushed $(or $(MODEL),taxi)"; \
	  source="--model_name $(or $(MODEL),taxi) --model_base_path build/model_repository/$(or $(MODEL),taxi)"; fi; \
	$(PY) -m serving.server $$source --rest_api_port 8501 --port 8500 --enable_batching \
	  --batching_parameters_file serving/config/batching.config --rest_api_num_threads 64 & server=$$!; \
	PROXY_ENV_FILE=configs/proxy.env PROXY_MODEL_REPOSITORY=build/model_repository \
	  $(PY) -m serving.proxy --port 8080 --log build/prediction_log.sqlite & proxy=$$!; \
	trap 'kill -TERM $$proxy $$server 2>/dev/null' INT TERM; \
	wait $$proxy; kill -TERM $$server 2>/dev/null; wait $$server

bench-serving: ## in-process signature call vs REST through the local server (needs a pushed model)
	$(PY) -m benchmarks.bench_serving

monitor: ## skew and drift of served traffic vs training and the previous window; writes build/monitor/ (RETRAIN=1 SPEC=<a spans spec> starts make retrain's run on anomalies) [LOG=path|postgresql://...]
	$(PY) -m ops.monitor --log $(or $(LOG),build/prediction_log.sqlite) --model $(or $(MODEL),taxi) --spec $(SPEC) --env $(ENV) $(if $(WINDOW_HOURS),--window_hours $(WINDOW_HOURS)) $(if $(RETRAIN),--retrain)

export-span: ## served traffic + late labels -> a new span in the spec's CSV format: make export-span SPEC=<spans spec with served:> LABELS=file [HOURS=24 LOG= SPANS=build/spans]
	@$(PY) -m ops.export_span --log $(or $(LOG),build/prediction_log.sqlite) --labels $(LABELS) --spec $(SPEC) --spans $(or $(SPANS),build/spans) $(if $(HOURS),--window_hours $(HOURS)) $(if $(METADATA),--metadata $(METADATA))

demo-feedback: ## the feedback loop simulated: naive retraining on logged offers vs the proxy's holdback (figures)
	$(PY) -m ops.feedback_loop --json build/feedback_loop.json

demo-drift: ## the continuous-training loop on drifting taxi spans: train, promote, serve, monitor, export, retrain (figures in build/demo_drift.json) [SPANS=2 ROWS=2500]
	$(PY) -m ops.demo_drift --json build/demo_drift.json $(if $(SPANS),--spans $(SPANS)) $(if $(ROWS),--rows_per_span $(ROWS))

ab-report: ## A/B go/no-go from the prediction log: make ab-report LABELS=file [A=stable B=canary HOURS=24 LOG=path|postgresql://...]; exit 0 GO, 1 NO-GO, 3 not enough data
	$(PY) -m ops.ab_report --log $(or $(LOG),build/prediction_log.sqlite) $(if $(LABELS),--labels $(LABELS)) --model $(or $(MODEL),taxi) --a $(or $(A),stable) --b $(or $(B),canary) $(if $(HOURS),--window_hours $(HOURS)) --json build/ab_report.json

# Not echoed: LOG may hold a password (the job prints the URL masked).
retention: ## trim the prediction log: make retention MAX_AGE_DAYS=30 and/or MAX_ROWS=n [LOG=path|postgresql://...]
	$(if $(or $(MAX_AGE_DAYS),$(MAX_ROWS)),,$(error MAX_AGE_DAYS or MAX_ROWS is required))
	@$(PY) -m serving.retention --log '$(or $(LOG),build/prediction_log.sqlite)' $(if $(MAX_AGE_DAYS),--max_age_days $(MAX_AGE_DAYS)) $(if $(MAX_ROWS),--max_rows $(MAX_ROWS))

batch-predict: ## predictions for a CSV through a pushed model: make batch-predict INPUT=file.csv [MODEL=taxi] [VERSION=n|LABEL=stable]
	$(PY) -m ops.batch_predict --model $(or $(MODEL),taxi) --input $(INPUT) --output $(or $(OUTPUT),build/batch_predictions) $(if $(VERSION),--version $(VERSION)) $(if $(LABEL),--label $(LABEL))

bench-proxy: ## what the proxy adds: one client and 50 clients for 60 s, direct vs through the proxy
	$(PY) -m benchmarks.bench_proxy

bench-scale: ## the pipeline at 1x, 10x and 50x the taxi rows: time per component and peak memory (SIZES=1,10)
	$(PY) -m benchmarks.bench_scale $(if $(SIZES),--sizes $(SIZES))

bench-pipeline: ## our pipeline vs TFX's taxi native-Keras example, first run and unchanged rerun
	$(PY) -m benchmarks.bench_pipeline

.PHONY: bench-transform-cache
bench-transform-cache: ## Transform's analysis of 3 taxi spans with the cache of the older 2, without, and the newest alone, interleaved (ROUNDS=2 ROWS=2500)
	$(PY) -m benchmarks.bench_transform_cache $(if $(ROUNDS),--rounds $(ROUNDS)) $(if $(ROWS),--rows $(ROWS))

clean:
	rm -rf build
