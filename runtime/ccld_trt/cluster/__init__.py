"""``ccld-trt cluster``: the pipeline on Ray Serve, with the U-Net calls of concurrent requests merged per step.

batcher   a thread-safe merger of U-Net evaluations (no Ray, no torch networks)
rows      merged evaluations as one per-row U-Net call, each request's CFG sum taken apart again
api       the HTTP JSON <-> pipeline Request, validated with the library's checks
replica   one replica's models, batcher and request handling (no Ray)
ingress   the HTTP front: keys, body size, a fair share per client, health, the access log (no Ray)
local_ray the local Ray ``cluster`` starts: every port on loopback, token auth, private files
app       Ray and Ray Serve: start or join a cluster, deploy the replicas, run until interrupted
"""
