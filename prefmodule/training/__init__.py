"""Training machinery: every callback, checkpoints, resume, the non-finite guard, throughput, the optimizer, the
CLI. The only home of Lightning's private APIs, each use commented with the Lightning version it was checked on."""
