"""The contract between the stages: the names one stage writes and another reads (files, folders,
columns, the record keys a later stage looks up), defined once and imported by the writer and every reader.
docs/CONTRACTS.md describes what the files hold; this module is the source of their names.

Why here: the lowest layer (``dit_core`` <- ``ray_jobs`` <- ``pipelines``, imports point down) has
writers too (the autoencoder folder, the classifier, the diffusers export), so only a module of
``dit_core`` can be imported by all of them. It holds names only and imports nothing, so importing
it costs nothing and pulls no job in: a stage that reads another stage's output imports this
module, never the other stage's job. ``tests/test_contract.py`` checks that no other module spells
one of these names as a string constant of its own.

The report files of the DVC stages (``metrics/*.json``, ``metrics/train_loss.csv``) are named by
``dvc.yaml``, which passes them to each stage as ``--metrics``/``--plots``; their keys are listed in
docs/CONTRACTS.md.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Any published folder output, and a stage's output kept in the store (ray_jobs/storage.py)
# ---------------------------------------------------------------------------------------------
VERSION_KEY = "version"                 # in a folder's top-level record: the published version folder ...
VERSION_PREFIX = "v-"                   # ... named v-<n>
LOCATION_FILE = "location.json"         # in a stage's local output folder when the output lives in the store

# ---------------------------------------------------------------------------------------------
# data/prepared/ (prepare -> train_autoencoder, encode, train_classifier, evaluate)
# ---------------------------------------------------------------------------------------------
MANIFEST_FILE = "manifest.json"         # its record: splits, shards, classes, fingerprint
IMAGE_COLUMN = "image"                  # PNG bytes, RGB (also the sample shards' and the pyfunc model's output)
LABEL_COLUMN = "label"                  # int32 class id (also the latent and sample shards')
KEY_COLUMN = "key"                      # the source's name for the item (also the latent shards')

# ---------------------------------------------------------------------------------------------
# The keys of the records a later stage reads: manifest.json (prepare), stats.json (encode; a
# model carries it as its ``latents``), summary.json (sample). docs/CONTRACTS.md lists the rest.
# ---------------------------------------------------------------------------------------------
SPLITS_KEY = "splits"                   # manifest.json: split -> {COUNT_KEY, "per_class", SHARDS_KEY}
SHARDS_KEY = "shards"                   # a split's shard files (manifest.json); split -> shard files (stats.json)
COUNT_KEY = "count"                     # a split's rows (manifest.json)
IMAGE_SIZE_KEY = "image_size"           # manifest.json: the images' side in pixels
NUM_CLASSES_KEY = "num_classes"         # manifest.json, stats.json
CLASS_NAMES_KEY = "class_names"         # manifest.json, stats.json: class id -> name
DATASET_KEY = "dataset"                 # manifest.json, stats.json: the registered model's default name follows it
FINGERPRINT_KEY = "fingerprint"         # manifest.json (of the images), stats.json (of the latents)
AUTOENCODER_PATH_KEY = "autoencoder_path"   # stats.json: the autoencoder the latents decode with
SCALE_FACTOR_KEY = "scale_factor"       # stats.json: the latent scale
LATENT_SHAPE_KEY = "latent_shape"       # stats.json: [C, H, W]
VIEWS_KEY = "views"                     # stats.json: the stored views (LATENT_VIEWS' keys)
COUNTS_KEY = "counts"                   # stats.json: split -> rows
MODEL_VERSION_KEY = "model_version"     # summary.json: the exact models:/name/<version> sampled
WEIGHTS_SHA256_KEY = "weights_sha256"   # summary.json: the digest of the weights sampled

# ---------------------------------------------------------------------------------------------
# An autoencoder folder (models/autoencoder/ or a pretrained one)
# ---------------------------------------------------------------------------------------------
AUTOENCODER_RECORD_FILE = "autoencoder.json"   # id, scale_factor, latent_channels, downsample, image_size

# ---------------------------------------------------------------------------------------------
# data/latents/ (encode -> train)
# ---------------------------------------------------------------------------------------------
LATENT_STATS_FILE = "stats.json"        # its record: autoencoder, scale factor, views, shards, fingerprint
# The views of an image the encode stage can store, each with its (posterior mean, posterior std)
# columns: "image" always, "flip" (its horizontal mirror) only where training flips.
LATENT_VIEWS: dict[str, tuple[str, str]] = {"image": ("mean", "std"), "flip": ("mean_flip", "std_flip")}

# ---------------------------------------------------------------------------------------------
# A training run's checkpoints (train -> sample, export, a resumed train)
# ---------------------------------------------------------------------------------------------
TRAIN_IDENTITY_FILE = "train_identity.json"   # beside a run's checkpoints: the settings it was started with
CHECKPOINT_STATE_FILE = "state.pt"            # inside each checkpoint directory
TRAIN_HISTORY_FILE = "history.json"           # beside it: every logged row so far (step, loss, ...)
TRAIN_ATTEMPTS_FILE = "attempts.json"         # and the steps each attempt (start, resume, restart) executed

# ---------------------------------------------------------------------------------------------
# The trained model: its bundle (models/dit/, the registered pyfunc's artifact) and records
# ---------------------------------------------------------------------------------------------
MODEL_BUNDLE_ARTIFACT = "bundle"        # the pyfunc model's artifact: the bundle folder
MODEL_CONFIG_FILE = "dit.json"          # the bundle's record: format, configs, sampling defaults, file sizes
MODEL_WEIGHTS_FILE = "dit.safetensors"  # the EMA weights
MODEL_AUTOENCODER_DIR = "autoencoder"   # the autoencoder folder it decodes with
TRAINED_RECORD_FILE = "trained.json"    # in models/dit/: the training run, its MLflow run and version, the checkpoint
MODEL_INFO_ARTIFACT = "model_info/model_info.json"   # in the MLflow run: model_config, diffusion, latents
CLASS_LABEL_COLUMN = "class_label"      # the pyfunc model's input (with SEED_COLUMN) and output (with IMAGE_COLUMN)

# ---------------------------------------------------------------------------------------------
# models/classifier/ (train_classifier -> evaluate)
# ---------------------------------------------------------------------------------------------
CLASSIFIER_WEIGHTS_FILE = "classifier.pt"     # the state dict
CLASSIFIER_CONFIG_FILE = "classifier.json"    # its record: config and metrics

# ---------------------------------------------------------------------------------------------
# samples/ (sample -> evaluate)
# ---------------------------------------------------------------------------------------------
SAMPLE_CONFIG_FILE = "sample_config.json"     # the settings that decide the images (a resumed run must match)
SAMPLE_SUMMARY_FILE = "summary.json"          # images, speed, the exact model version and its weights' digest
SAMPLES_NPZ_FILE = "samples.npz"              # the ADM evaluation layout (NPZ_IMAGES, NPZ_LABELS)
SAMPLE_GRID_FILE = "grid.png"
SAMPLE_BASELINE_DIR = "baseline"              # the untrained model's samples, the same shard layout (parquet only)
SAMPLE_PARQUET_DIR = "parquet"                # shard-NNNNNN.parquet: INDEX_COLUMN, LABEL_COLUMN, SEED_COLUMN, IMAGE_COLUMN
SAMPLE_PNG_DIR = "png"                        # shard-NNNNNN.tar: <index>.png and <index>.cls
INDEX_COLUMN = "index"                        # int64: the image's place in the run
SEED_COLUMN = "seed"                          # uint64: the image's own noise seed
NPZ_IMAGES = "arr_0"                          # an ADM .npz batch: uint8 N x H x W x 3 ...
NPZ_LABELS = "arr_1"                          # ... and int64 labels

# ---------------------------------------------------------------------------------------------
# A diffusers folder (dit export / dit import): diffusers' own names
# ---------------------------------------------------------------------------------------------
DIFFUSERS_TRANSFORMER_DIR = "transformer"
DIFFUSERS_VAE_DIR = "vae"
DIFFUSERS_SCHEDULER_DIR = "scheduler"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model"   # the weight file's stem
DIFFUSERS_PIPELINE_FILE = "pipeline.py"              # in an exported folder: diffusers' custom_pipeline=<folder> loads it

# ---------------------------------------------------------------------------------------------
# The workspace's MLflow store when MLFLOW_TRACKING_URI is unset (ray_jobs/tracking.py)
# ---------------------------------------------------------------------------------------------
TRACKING_DB_FILE = "mlflow.db"          # in the workspace
TRACKING_ARTIFACTS_DIR = "mlruns"       # beside the SQLite store: the artifacts of its experiments
