"""Prometheus metrics: a collector that reads the BPF maps at scrape time
(collector), the workload labels on its series (workloads), the text
format (exposition) and the HTTP endpoint (http)."""
