"""The complete default config of keras-sft: every key the code reads.

Experiment config files (`configs/*.py`, or your own anywhere) are thin
overrides of this one; it ships inside the package, so a config loads from
any working directory and any path, also copied into another project:

    from keras_sft import default_config

    def get_config():
        config = default_config.get_config()
        config.num_epochs = 3
        return config

`python -m keras_sft.main --config=configs/default.py` runs it as it is.

The returned ConfigDict is locked, so a typo such as `--config.num_epoch=3` is
an error rather than a silently ignored flag. Values that are derived (the
learning rate actually used, steps per epoch, the total number of steps) are
computed by `keras_sft.training.recipe.make_plan` from these and logged at
start.
"""

import ml_collections


def get_config():
  """Returns the default hyperparameters and run settings."""
  config = ml_collections.ConfigDict()

  # --- Data -----------------------------------------------------------------
  # A tfds name (`cifar10`, `oxford_flowers102`, ...), or `folder:PATH` for
  # an image folder: PATH/train/<class>/*, PATH/test/<class>/* (JPEG/PNG).
  config.dataset = 'cifar10'
  # tfds split strings, slices included (`train[:90%]`, `train[90%:]`). For a
  # folder: split folder names (`train`, `test`, `val`), sliceable the same
  # way.
  config.train_split = 'train'
  config.eval_split = 'test'
  # Folders only: when > 0, hold out this fraction of each class of the train
  # split for evaluation (eval_split is then unused); PATH may then hold the
  # class folders directly, PATH/<class>/*. For tfds use split slices.
  config.validation_fraction = 0.0
  # Folders only: every image is decoded once before training; False: an
  # unreadable file is an error listing the paths; True: skip and count them.
  config.skip_corrupt_images = False
  # Where tfds keeps prepared data. None: tfds' default (~/tensorflow_datasets).
  # Offline: put the archive tfds would download into
  # `<data_dir>/downloads/manual/` (CIFAR-10: cifar-10-binary.tar.gz).
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  # Side length, in pixels, of the square images the model sees.
  config.image_size = 224
  # None, or the side every training image is resized to before its random
  # crop to image_size (BiT-HyperRule: 160 -> 128, 448 -> 384). None: pad-and-
  # crop for images already image_size, else resize to image_size / 0.875.
  config.resize_size = ml_collections.FieldReference(None, field_type=int)
  # Augmentation of every training image (batch-level augmentation is under
  # "Fine-tuning recipe"). random_crop: images of side image_size are padded
  # by 12.5% and cropped back at a random position (CIFAR), others resized
  # to image_size / 0.875 (or resize_size) and cropped at random (ImageNet);
  # False: the eval view (centre crop). random_flip: horizontal flips.
  # Both on: the standard recipe for photos, where objects appear anywhere
  # and either way round (CIFAR, ImageNet, BiT). On centred, aligned images
  # both cost accuracy, from scratch and fine-tuning (benchmarks/ACCURACY.md,
  # "What the augmentation costs"): switch them off for data whose objects are centred and
  # never mirrored (digits, scans, product shots), or let
  # `python -m keras_sft.tune` measure it on yours.
  config.random_crop = True
  config.random_flip = True
  # Elements kept in the shuffle buffer of the training set.
  config.shuffle_buffer_size = 10_000
  # Class imbalance (keras_sft.data.balance), both off by default: on
  # balanced data they change nothing, and on imbalanced data whether they
  # help depends on what is measured (top-1 favours the frequent classes;
  # the report's macro-F1 and balanced accuracy do not). class_weight: None,
  # 'balanced' (scikit-learn's n_samples / (n_classes · count_c), counted on
  # train_split; for tfds one pass over its labels) or {class name or class
  # id: weight} (others 1.0), applied as per-example sample weights.
  # Measured on a 10:1 imbalanced fine-tuning proxy (balanced test set,
  # benchmarks/ACCURACY.md, "Recipe switches"): 'balanced' raised top-1
  # 78.2% -> 85.9% and macro-F1 0.776 -> 0.859; sampling='balanced' 81.5%.
  # Still off by default: a tfds dataset pays a counting pass for it.
  config.class_weight = ml_collections.FieldReference(None, field_type=object)
  # 'shuffle': each example once per epoch. 'balanced': each draw picks a
  # class uniformly, then that class's next example (minority classes
  # repeat); its first pass reads the split once per class (README "Your
  # own data").
  config.sampling = 'shuffle'
  # Keep decoded training and eval images in memory after the first epoch
  # (large ones shrunk first to twice the side the pipeline resizes to).
  # Right for CIFAR-sized data; switch off for data larger than host memory.
  config.cache = True

  # --- Model ----------------------------------------------------------------
  # The backbone, from keras.applications (README "Backbones"): 'resnet50',
  # 'resnet101', 'resnet152', 'resnet50v2', 'efficientnetv2_b0' ... '_b3',
  # 'efficientnetv2_s', 'convnext_tiny', 'convnext_small' or
  # 'mobilenetv3_large'. Each gets its own preprocessing inside the network.
  config.model = 'resnet50'
  # 'imagenet', None (random initialization) or a path to a local
  # `.weights.h5`/`.h5` file of the model without its top, for offline runs
  # (README "Backbones" names each model's file).
  config.weights = ml_collections.FieldReference('imagenet', field_type=str)
  # Dropout before the new classification head; 0 disables it.
  config.dropout_rate = 0.0
  # The backbone's BatchNormalization layers: 'trained' (Keras' default),
  # 'frozen' (non-trainable: inference mode, moving statistics and γ/β kept)
  # or 'synchronized' (batch statistics all-reduced across replicas). ConvNeXt
  # has no BatchNormalization: only 'trained' (and momentum None) there.
  # 'frozen' can win when the pretrained statistics fit the new data and
  # lose badly when they do not (benchmarks/ACCURACY.md has both cases);
  # 'trained' stays the default because with weights=None 'frozen' would
  # train a network without normalization.
  config.batch_norm = 'trained'
  # Momentum m of the BN moving statistics, moving = m·moving + (1 - m)·batch;
  # None: the layers' own (0.99 in Keras' ResNet50; PyTorch's momentum=0.1 is
  # m = 0.9). A lower momentum helps short runs whose statistics lag the
  # weights, but precise BN (below) does more and makes the momentum matter
  # only between evaluations (benchmarks/ACCURACY.md), so the default stays
  # Keras'.
  config.batch_norm_momentum = ml_collections.FieldReference(
      None, field_type=float)
  # Precise BN: before each evaluation, the best-checkpoint decision and the
  # export, re-estimate the moving statistics of the trained BN layers as
  # population statistics over this many training batches, computed with
  # the weights being evaluated (keras_sft.models.precise_bn). 0: off. It
  # raised top-1 in every benchmark row (benchmarks/ACCURACY.md), most on
  # short runs and small data. Costs that many forward passes
  # per evaluation.
  # At most one pass over the train split: a larger value is capped (logged).
  config.precise_bn_batches = 20
  # None, or a stage of the model (ResNets: 'conv1'..'conv5'; others in
  # README "Backbones"): freeze the backbone up to and including that stage
  # for the whole run (non-trainable, not decayed, BN in inference).
  config.freeze_until = ml_collections.FieldReference(None, field_type=str)

  # --- Optimization ---------------------------------------------------------
  # Images per optimizer step, summed over all replicas and workers.
  config.global_batch_size = 128
  config.num_epochs = 10
  # Steps per epoch. None: the number of full global batches in the train
  # split (the remainder is dropped). Set it for short smoke runs.
  config.steps_per_epoch = ml_collections.FieldReference(None, field_type=int)
  # Peak learning rate for a global batch of `learning_rate_batch_size`
  # images. The rate used is scaled linearly with the global batch size
  # (Goyal et al. 2017): learning_rate * global_batch_size /
  # learning_rate_batch_size.
  config.learning_rate = 0.01
  config.learning_rate_batch_size = 256
  # Linear warmup from 0 to the peak, then 'cosine' decay to 0 at the end,
  # or 'step': the LR x lr_decay_factor at each of lr_boundary_fractions of
  # the total steps (BiT-HyperRule: x0.1 at 30%, 60%, 90%).
  config.warmup_epochs = 1.0
  config.lr_schedule = 'cosine'
  config.lr_boundary_fractions = (0.3, 0.6, 0.9)
  config.lr_decay_factor = 0.1
  # 'sgd' (with momentum) or 'adamw'.
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.nesterov = False
  # AdamW's decoupled weight decay (not the L2 term below). Only for 'adamw'.
  config.adamw_weight_decay = 0.0
  # λ in loss = cross-entropy + λ·Σ‖w‖², summed over the kernels of
  # Conv (depthwise too) and Dense layers (no ½; biases, BatchNorm,
  # LayerNorm and ConvNeXt's LayerScale excluded). The gradient of the
  # term is 2λw, so λ = wd / 2 for an SGD "weight_decay" of wd.
  config.weight_decay = 5e-5
  # What the L2 term pulls the backbone's kernels toward: 'zero' (the sum
  # above) or 'pretrained' (L2-SP, Li et al. 2018: λ·Σ‖w − w₀‖² with w₀ the
  # pretrained kernels, saved in every backup; the head still toward 0),
  # which keeps a fine-tuned backbone near what it learned. Refused with
  # weights=None (w₀ would be random). Default 'zero': the usual decay, and
  # what runs before this key did.
  config.weight_decay_target = 'zero'
  # None, or c > 0: scale the gradient (of CE + λ·R) by min(1, c / ‖g‖),
  # ‖g‖ its global norm summed over replicas and unscaled (mixed_float16),
  # before the backbone multiplier. Default None: no clipping, as before;
  # on several replicas it costs one more all-reduce of the gradients.
  config.clip_global_norm = ml_collections.FieldReference(
      None, field_type=float)
  # k micro-batches per optimizer step: each replica's share of
  # global_batch_size (still the images per optimizer step) is split into k
  # micro-batches run one after another, and the mean of their gradients is
  # applied once. Same step as one batch, except for BatchNorm's batch
  # statistics (per micro-batch) and its moving statistics (k updates per
  # step). Less activation memory, same steps, LR schedule and EMA. Must
  # divide global_batch_size / replicas. Default 1: no accumulation.
  config.gradient_accumulation_steps = 1

  # --- Fine-tuning recipe (README "Recipe") -----------------------------------
  # ε of label smoothing: targets (1 - ε)·one_hot + ε / num_classes. 0: off.
  config.label_smoothing = 0.0
  # Training-batch augmentation with Keras' own layers, after batching
  # (keras_sft.data.batch_augment). MixUp: α of Beta(α, α); 0: off.
  config.mixup_alpha = 0.0
  # CutMix: α of Beta(α, α), in [0, 1]; 0: off. With MixUp also on, one of
  # the two per batch.
  config.cutmix_alpha = 0.0
  # RandAugment: operations per batch (0: off) and strength in [0, 1]
  # (Keras' `factor`; timm's magnitude m is m / 10).
  config.randaugment_num_ops = 0
  config.randaugment_magnitude = 0.0
  # Random Erasing (keras.layers.RandomErasing): the probability that an
  # image gets a random rectangle (Keras' area range) replaced by noise, after
  # RandAugment and before MixUp/CutMix; 0: off (timm's `reprob`, often
  # 0.25). keras.layers.AugMix is not offered: see batch_augment.
  config.random_erasing_probability = 0.0
  # Momentum m of an exponential moving average of the weights (Keras'
  # optimizer `use_ema`, warmed up as min(m, (1 + t) / (10 + t)) at step t);
  # None: off. When on, per-epoch validation, best.weights.h5, the final
  # evaluation and the export use the EMA weights (with their own BN
  # statistics when precise_bn_batches > 0); the raw weights are measured
  # too, and exported instead if they evaluate better.
  config.ema_momentum = ml_collections.FieldReference(None, field_type=float)
  # Staged fine-tuning: epochs (from the start) in which only the head trains
  # (backbone gradients x 0, read from the optimizer step, so resumable), then
  # the full network. 0: off. Refused with optimizer='adamw' (its bias
  # correction would over-step the backbone when it unfreezes). Only weights
  # are frozen in that phase: with batch_norm='trained' the backbone's BN
  # layers still normalize with batch statistics and their moving statistics
  # follow the batches; batch_norm='frozen' keeps them for the whole run.
  config.head_only_epochs = 0.0
  # Gradient multiplier of the backbone; the head uses the base LR. For SGD
  # it is exactly an LR multiplier; refused with AdamW unless 1.0.
  config.backbone_learning_rate_multiplier = 1.0
  # None, or d in (0, 1]: layer-wise learning-rate decay (timm's
  # layer_decay, by stage): stage i of the backbone's n (README
  # "Backbones": ResNets conv1..conv5) learns at d^(n - i) times the LR,
  # the head and the last stage at 1. A true per-variable learning rate for
  # SGD and AdamW (AdamW's decoupled decay scaled too). For SGD it
  # multiplies with backbone_learning_rate_multiplier. Default None: one
  # learning rate for all, as before.
  config.layer_decay = ml_collections.FieldReference(None, field_type=float)

  # --- Semi-supervised (README "Recipe": few labels, many images) ------------
  # Unlabelled images: None (off), folder:PATH (JPEG/PNG anywhere under
  # PATH, no class folders) or a split string of the tfds dataset above
  # (its labels unread). Checked as labelled folders are; duplicates of
  # labelled images are counted (all duplicates: refused).
  config.unlabeled = ml_collections.FieldReference(None, field_type=str)
  # None, 'fixmatch' (Sohn et al. 2020) or 'self_training' (a teacher on
  # the labelled images labels the unlabelled ones, a student trains on
  # both: keras_sft/training/self_training.py); set with `unlabeled`, never
  # alone. At 10 labels per class on the fine-tuning proxy self-training
  # helped and FixMatch hurt (benchmarks/ACCURACY.md). FixMatch's epochs
  # stay epochs over the labelled images.
  config.semi_supervised = ml_collections.FieldReference(None, field_type=str)
  # μ: unlabelled images per labelled image in a step (FixMatch's 7). A
  # step then pushes (1 + 2μ)·global_batch_size images through the network.
  config.fixmatch_mu = 7
  # τ in (0, 1]: weak-view confidence above which a pseudo-label counts
  # (FixMatch's 0.95).
  config.fixmatch_threshold = 0.95
  # λ_u > 0: weight of the unlabelled term (FixMatch's 1).
  config.fixmatch_unlabeled_weight = 1.0
  # The strong view: Keras RandAugment operations per batch and strength
  # (FixMatch: 2 operations; 0.5 is Keras' default factor), then a cutout
  # square of side up to this fraction of the image (FixMatch's 0.5).
  config.fixmatch_randaugment_num_ops = 2
  config.fixmatch_randaugment_magnitude = 0.5
  config.fixmatch_cutout_fraction = 0.5
  # Self-training: a teacher prediction is used when its confidence is >=
  # this (0: any); per class at most this fraction of the class's share of
  # the unlabelled images, U / C, the most confident first (0.5: the
  # proxy's pseudo-labels were 95% right at 0.5, 84% over all images).
  config.self_training_threshold = 0.5
  config.self_training_fraction = 0.5
  # Teacher -> student rounds; each student teaches the next (Noisy
  # Student: 3).
  config.self_training_rounds = 1
  # Epochs of each student over labelled + pseudo-labelled images. None:
  # the fewest that take as many steps as the teacher's run (the cost of
  # one more run).
  config.self_training_epochs = ml_collections.FieldReference(None,
                                                              field_type=int)
  # Where each student starts: 'teacher' (its teacher's network, then
  # trained on) or 'pretrained' (`weights`, as the teacher did; Noisy
  # Student's fresh student). 'teacher': a fresh student underfits in the
  # teacher's number of steps (benchmarks/ACCURACY.md, issue #22's section).
  config.self_training_student_init = 'teacher'
  # Noisy Student's input noise on each student alone (the teacher and its
  # predictions keep the run's own augmentation): RandAugment operations per
  # batch (0: the student's augmentation is the run's) and strength in [0, 1],
  # in place of the run's randaugment_* keys.
  config.self_training_randaugment_num_ops = 0
  config.self_training_randaugment_magnitude = 0.5

  # --- Distribution and compilation -----------------------------------------
  # 'float32', 'mixed_bfloat16', 'mixed_float16' (with dynamic loss scaling)
  # or 'auto': bf16 on GPUs with compute capability >= 8.0 and on CPUs with
  # AVX512_BF16/AMX, else float32 (keras_sft.training.precision).
  config.precision = 'float32'
  # 'auto' (TPU, else TF_CONFIG with several tasks: multi_worker_mirrored,
  # else several GPUs: mirrored, else default), 'default' (no strategy),
  # 'one_device', 'mirrored' (all local GPUs), 'multi_worker_mirrored' (all
  # GPUs of the machines in $TF_CONFIG), 'tpu'. See
  # keras_sft/training/distribution.py.
  config.distribution = 'auto'
  # multi_worker_mirrored: seconds to wait for every task of TF_CONFIG to
  # start before failing with the missing ones named.
  config.startup_timeout_seconds = 300
  # multi_worker_mirrored: a gradient all-reduce that takes longer than this
  # (a worker died) fails the run instead of hanging. None: wait forever.
  config.collective_timeout_seconds = ml_collections.FieldReference(
      1800, field_type=int)
  # XLA for each replica's step: 'auto' (on with GPUs/TPUs, off on CPUs,
  # where XLA made our step slower: README "Performance" has the
  # measurements), True or False. Unlike Keras' own 'auto',
  # it stays on under tf.distribute strategies.
  config.jit_compile = 'auto'
  # Train steps run inside one tf.function call (fewer host round trips).
  # Must divide the steps per epoch and eval_steps (Keras runs whole calls).
  config.steps_per_execution = 1

  # --- Progress ---------------------------------------------------------------
  # Besides one line per epoch (and Keras' progress bar on a terminal), log
  # step, loss, images/s and the ETA every this many steps.
  config.log_every_steps = 100

  # --- Run bookkeeping ------------------------------------------------------
  # Seeds the shuffle order, augmentation and the head's initialization.
  config.seed = 0
  # Optimizer steps between backups of the run (also at every epoch end).
  config.checkpoint_every_steps = 500
  # Backups kept in <workdir>/checkpoints (the newest ones).
  config.keep_checkpoints = 2
  # Evaluate on the eval split every this many epochs (and after the last).
  config.eval_every_epochs = 1
  # Eval batches; None: the whole eval split.
  config.eval_steps = ml_collections.FieldReference(None, field_type=int)
  # Export a SavedModel for serving to <workdir>/export/<next version>/ after
  # training (TF Serving's layout; an existing version is never replaced).
  config.export = True
  # Classes in the export's top-k outputs (top_k_class_ids, ..._names,
  # ..._probabilities); capped at the number of classes.
  config.export_top_k = 5
  # The most pixels (width x height) an image may have to be decoded, read
  # from its JPEG/PNG header first: a 250 KB PNG can hold 16000x16000 pixels
  # (768 MB decoded). Larger images are refused by the export's
  # serve_image_bytes (the value is fixed when the export is written) and
  # are unreadable files in a folder dataset.
  config.max_image_pixels = 40_000_000
  # litert_int8 export (python -m keras_sft.export --format=litert_int8):
  # training images (a seeded draw from train_split, resized as the eval
  # split is) that calibrate the int8 ranges of the post-training full-integer
  # quantization. Its accuracy cost is then measured on eval_steps batches
  # of the eval split (all if None) and written into the export's metadata.
  config.export_representative_images = 200
  # Temperature scaling (Guo et al. 2017; keras_sft.training.calibration):
  # None, or a split held out from both train_split and eval_split (a
  # folder's `val`, or a tfds slice such as `train[90%:]` with
  # train_split='train[:90%]'). After training, one T > 0 minimizing the NLL
  # of softmax(logits / T) on it is fitted; every export's probabilities
  # are then softmax(logits / T) (logits unchanged), and the report gives
  # the ECE on the eval split before and after. None (T = 1) by default:
  # the default data (CIFAR-10's train and test) has no third split, and
  # one carved from the train split by default would either train on fewer
  # images or fit T on images the model was trained on (over-confident
  # there, so T too low); a split that may overlap either is refused.
  config.calibration_split = ml_collections.FieldReference(None,
                                                           field_type=str)

  config.lock()
  return config
