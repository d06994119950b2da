"""The deployment's offline checks (run by scripts/check-deploy, which installs the tools).

Each check prints one line; any failure is listed at the end and the exit status is 1.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import hcl2
import jsonschema
import yaml

KUBERNETES_VERSION = "1.31.0"
REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-1"]
ROLES = ["ingest", "aggregator", "reader"]
CRD_SCHEMAS = {"ServiceMonitor": "servicemonitor.json", "PrometheusRule": "prometheusrule.json", "ExternalSecret": "externalsecret.json"}
failures = []


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + detail}")
    if not ok:
        failures.append(name)


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def render(region):
    out = run(["kubectl", "kustomize", f"k8s/overlays/{region}"])
    check(f"kustomize renders {region}", out.returncode == 0, out.stderr.strip())
    return [d for d in yaml.safe_load_all(out.stdout) if d] if out.returncode == 0 else []


def validate(region, docs, tmp):
    native = [d for d in docs if d["kind"] not in CRD_SCHEMAS]
    path = os.path.join(tmp, f"{region}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump_all(native, f)
    out = run(["kubernetes-validate", "--strict", "--quiet", "-k", KUBERNETES_VERSION, path])
    check(f"{region}: {len(native)} objects valid for Kubernetes {KUBERNETES_VERSION} (strict)", out.returncode == 0, (out.stdout + out.stderr).strip()[-2000:])
    for d in docs:
        if d["kind"] in CRD_SCHEMAS:
            with open(os.path.join("k8s/schemas", CRD_SCHEMAS[d["kind"]])) as f:
                schema = json.load(f)
            try:
                jsonschema.validate(d, schema)
                check(f"{region}: {d['kind']}/{d['metadata']['name']} matches its schema", True)
            except jsonschema.ValidationError as e:
                check(f"{region}: {d['kind']}/{d['metadata']['name']} matches its schema", False, e.message)


def find(docs, kind, name):
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def overlay_assertions(region, docs, plan):
    planned = next(r for r in plan["regions"] if r["region"] == region)
    for role in ROLES:
        hpa = find(docs, "HorizontalPodAutoscaler", f"tally-{role}")
        got = (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) if hpa else None
        want = (planned[role]["min"], planned[role]["max"])
        check(f"{region}: {role} HPA bounds {got} are the capacity model's {want}", got == want)
        cm = find(docs, "ConfigMap", f"tally-{role}")
        check(f"{region}: {role} runs with TALLY_REGION={region}", cm is not None and cm["data"].get("TALLY_REGION") == region)
        workload = find(docs, "Deployment", f"tally-{role}")
        spec = workload["spec"]["template"]["spec"] if workload else {}
        c = spec.get("containers", [{}])[0]
        ca_file = (cm or {}).get("data", {}).get("TALLY_TLS_CA_FILE", "")
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        ca_volume = any(v.get("secret", {}).get("secretName") == "tally-credentials" for v in spec.get("volumes", []))
        check(
            f"{region}: {role} verifies TLS against the CA mounted from tally-credentials ({ca_file})",
            ca_volume and any(ca_file.startswith(m + "/") for m in mounts),
        )
        sc = c.get("securityContext", {})
        check(
            f"{region}: {role} is non-root with a read-only root filesystem and probes",
            spec.get("securityContext", {}).get("runAsNonRoot") is True
            and sc.get("readOnlyRootFilesystem") is True
            and c.get("readinessProbe", {}).get("httpGet", {}).get("path") == "/readyz"
            and c.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
        )
        check(f"{region}: {role} has a PodDisruptionBudget and a NetworkPolicy", find(docs, "PodDisruptionBudget", f"tally-{role}") is not None and find(docs, "NetworkPolicy", f"tally-{role}") is not None)
    deny = find(docs, "NetworkPolicy", "default-deny")
    check(f"{region}: the namespace denies by default", deny is not None and deny["spec"]["podSelector"] == {} and set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"})
    text = json.dumps(docs)
    check(f"{region}: no placeholder left", "set-by-overlay" not in text, "a base value the overlay should set")


def identity_problems(data):
    """What would let an ingest ConfigMap's voters vote as anyone: [] when none."""
    problems = []
    if str(data.get("TALLY_ANONYMOUS_VOTERS", "")).lower() in ("1", "true", "yes", "on"):
        problems.append("runs anonymous")
    for key in ("TALLY_JWT_ISSUER", "TALLY_JWT_AUDIENCE"):
        if not data.get(key):
            problems.append(f"no {key}")
    if not str(data.get("TALLY_JWKS_URL", "")).startswith("https://"):
        problems.append("no https TALLY_JWKS_URL")
    proxies = data.get("TALLY_TRUSTED_PROXIES", "")
    if not proxies or "0.0.0.0/0" in proxies or "::/0" in proxies:
        problems.append(f"trusted proxies {proxies!r}")
    try:
        if float(data.get("TALLY_IP_RATE", "0")) <= 0:
            problems.append("no per-address limit")
    except ValueError:
        problems.append("a bad TALLY_IP_RATE")
    if str(data.get("TALLY_SECURE_COOKIES", "")).lower() != "true":
        problems.append("cookies not Secure")
    return problems


def identity_assertions(region, docs):
    cm = find(docs, "ConfigMap", "tally-ingest")
    data = (cm or {}).get("data", {})
    problems = identity_problems(data)
    check(f"{region}: ingest authenticates voters (JWKS URL, issuer, audience; trusted proxies; address limit; Secure cookies)", not problems, ", ".join(problems))
    cidr = f"10.{REGIONS.index(region) + 1}."
    check(f"{region}: ingest trusts only its load balancer's subnets ({data.get('TALLY_TRUSTED_PROXIES')})", str(data.get("TALLY_TRUSTED_PROXIES", "")).startswith(cidr))
    # The check must be able to fail: each way of voting as anyone is caught.
    caught = all(identity_problems({**data, **bad}) for bad in (
        {"TALLY_ANONYMOUS_VOTERS": "true"},
        {"TALLY_JWKS_URL": ""},
        {"TALLY_JWT_ISSUER": ""},
        {"TALLY_JWT_AUDIENCE": ""},
        {"TALLY_TRUSTED_PROXIES": "0.0.0.0/0"},
        {"TALLY_IP_RATE": "0"},
    ))
    check(f"{region}: self-test: an anonymous or unauthenticated ingest is caught", caught)
    ingress = find(docs, "Ingress", "tally")
    waf = (ingress or {}).get("metadata", {}).get("annotations", {}).get("alb.ingress.kubernetes.io/wafv2-acl-arn", "")
    check(f"{region}: its load balancer sits behind the region's WAF", waf.startswith(f"arn:aws:wafv2:{region}:") and f"/webacl/tally-{region}/" in waf, waf)


def env_source(docs, role, name):
    """Where a role's container gets variable `name`: ("value", v) from its ConfigMap or env,
    ("secret", key) from a secret, or None."""
    workload = find(docs, "Deployment", f"tally-{role}") or {}
    containers = workload.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])
    for e in containers[0].get("env", []):
        if e["name"] == name:
            if "value" in e:
                return ("value", e["value"])
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            return ("secret", ref["key"]) if ref else None
    cm = find(docs, "ConfigMap", f"tally-{role}")
    if cm and name in cm.get("data", {}):
        return ("value", cm["data"][name])
    return None


def rust_str_const(path, name):
    """A `pub const NAME: &str = "...";` of a Rust file, with its line continuations joined."""
    with open(path) as f:
        text = f.read()
    start = text.index(f"pub const {name}: &str =")
    literal = text[text.index('"', start) + 1:text.index('";', start)]
    return re.sub(r"\\\n\s*", "", literal)


def redis_deployment():
    """What the deployment gives the queue: the module's parsed resources and its defaults."""
    with open("terraform/modules/redis/main.tf") as f:
        parsed = scalars(hcl2.load(f))
    res = {}
    for entry in parsed.get("resource", []):
        for kind, named in entry.items():
            res.setdefault(kind, {}).update(named)
    variables = {k: v for entry in parsed.get("variable", []) for k, v in entry.items()}
    access = {}
    for entry in parsed.get("locals", []):
        found = entry.get("access", {})
        access.update(found[0] if isinstance(found, list) else found)  # a map parses as a one-map list
    return res, variables, access


def queue_problems(wait, deployment):
    """What would let a queue shard acknowledge a vote its failover could lose: [] when none.
    `wait` is ingest's TALLY_WAIT_REPLICAS."""
    res, variables, _ = deployment
    problems = []
    try:
        wait = int(wait)
    except (TypeError, ValueError):
        return [f"ingest's TALLY_WAIT_REPLICAS is {wait!r}"]
    if wait < 1:
        problems.append("ingest acknowledges before a replica has the vote (TALLY_WAIT_REPLICAS < 1)")
    group = res.get("aws_elasticache_replication_group", {}).get("shard", {})
    replicas = variables.get("replicas", {}).get("default", 0)
    if replicas < wait + 1:
        problems.append(f"{replicas} replicas a shard: a failover leaves fewer than the {wait} ingest waits for")
    if group.get("automatic_failover_enabled") is not True or group.get("multi_az_enabled") is not True:
        problems.append("no automatic Multi-AZ failover")
    params = res.get("aws_elasticache_parameter_group", {}).get("this", {}).get("parameter", [])
    params = params if isinstance(params, list) else [params]
    names = {p["name"]: str(p["value"]) for p in params}
    for rejected in ("appendonly", "appendfsync"):
        if rejected in names:
            problems.append(f"parameter {rejected}, which Multi-AZ ElastiCache rejects")
    if names.get("maxmemory-policy") != "noeviction":
        problems.append("a full queue may evict votes (maxmemory-policy is not noeviction)")
    return problems


def credential_problems(docs, deployment, acls):
    """Shared or over-broad queue credentials: [] when each role has its own, as in the code."""
    res, _, access = deployment
    problems = []
    ingest = env_source(docs, "ingest", "TALLY_REDIS_URLS")
    aggregator = env_source(docs, "aggregator", "TALLY_REDIS_URLS")
    if not (ingest and aggregator and ingest[0] == aggregator[0] == "secret"):
        problems.append("a role's Redis URLs are not from a secret")
    elif ingest == aggregator:
        problems.append(f"ingest and the aggregator share one Redis credential ({ingest[1]})")
    group = res.get("aws_elasticache_replication_group", {}).get("shard", {})
    if "auth_token" in group:
        problems.append("a shared AUTH token")
    users = res.get("aws_elasticache_user", {})
    default = users.get("default", {})
    if default.get("user_name") != "default" or not str(default.get("access_string", "")).startswith("off"):
        problems.append("the default user is not disabled")
    for role, acl in acls.items():
        if access.get(role) != f"on {acl}":
            problems.append(f"{role}'s access string differs from model::queue ({access.get(role)!r})")
    return problems


def replay_problems(wait, replica_regions):
    """What would let the primary's loss take counted votes with it: [] when none. `wait` is
    the aggregator's TALLY_WAIT_REPLICAS, `replica_regions` how many regions hold a replica."""
    try:
        wait = int(wait)
    except (TypeError, ValueError):
        return [f"the aggregator's TALLY_WAIT_REPLICAS is {wait!r}"]
    if wait < 1:
        return ["the aggregator deletes votes from Redis before any replica replayed their commit (TALLY_WAIT_REPLICAS < 1)"]
    if replica_regions < wait + 1:
        return [f"{replica_regions} replica regions: losing one leaves fewer than the {wait} the aggregator waits for"]
    return []


def replica_regions():
    count = 0
    for region in REGIONS:
        with open(f"terraform/regions/{region}/main.tf") as f:
            region_module = next((m["region"] for m in scalars(hcl2.load(f)).get("module", []) if "region" in m), {})
        count += region_module.get("postgres_role") == "replica"
    return count


def queue_assertions(region, docs):
    wait = (env_source(docs, "aggregator", "TALLY_WAIT_REPLICAS") or ("value", None))[1]
    replicas = replica_regions()
    problems = replay_problems(wait, replicas)
    check(f"{region}: votes leave Redis only once a replica in another region replayed their commit", not problems, "; ".join(problems))
    check(f"{region}: self-test: no replay wait, and a wait no surviving replica can meet, are caught", replay_problems("0", replicas) and replay_problems(wait, 1))
    deployment = redis_deployment()
    wait = (env_source(docs, "ingest", "TALLY_WAIT_REPLICAS") or ("value", None))[1]
    problems = queue_problems(wait, deployment)
    check(f"{region}: a vote is acknowledged only once a replica holds it, and a failover leaves one to wait for", not problems, "; ".join(problems))
    acls = {role: rust_str_const("model/src/queue.rs", f"{role.upper()}_ACL") for role in ("ingest", "aggregator")}
    problems = credential_problems(docs, deployment, acls)
    check(f"{region}: ingest and the aggregator log in to Redis as their own users, with model::queue's ACLs", not problems, "; ".join(problems))
    # The checks must be able to fail: each way of losing or over-sharing is caught.
    res, variables, access = deployment
    no_wait = queue_problems("0", deployment)
    one_replica = queue_problems(wait, (res, {**variables, "replicas": {"default": 1}}, access))
    aof = json.loads(json.dumps(res))
    aof["aws_elasticache_parameter_group"]["this"]["parameter"] = [{"name": "appendonly", "value": "yes"}]
    with_aof = queue_problems(wait, (aof, variables, access))
    shared = json.loads(json.dumps(docs))
    for d in shared:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tally-aggregator":
            for e in d["spec"]["template"]["spec"]["containers"][0]["env"]:
                if e["name"] == "TALLY_REDIS_URLS":
                    e["valueFrom"]["secretKeyRef"]["key"] = "ingest-redis-urls"
    shared_key = credential_problems(shared, deployment, acls)
    drifted = credential_problems(docs, deployment, {**acls, "ingest": acls["ingest"] + " +del"})
    check(f"{region}: self-test: no wait, one replica, an AOF parameter, a shared credential and a drifted ACL are each caught", all([no_wait, one_replica, with_aof, shared_key, drifted]))


def host_matches(pattern, host):
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


def routed_service(ingress, host, path):
    """The service the ALB sends a request to, reading the Ingress as the controller does: rules
    with a host matching it, then rules without a host; the longest matching path."""
    rules = ingress["spec"].get("rules", [])
    for candidates in ([r for r in rules if "host" in r and host_matches(r["host"], host)], [r for r in rules if "host" not in r]):
        matches = []
        for r in candidates:
            for p in r.get("http", {}).get("paths", []):
                exact = p.get("pathType") == "Exact"
                if (exact and path == p["path"]) or (not exact and (path + "/").startswith(p["path"].rstrip("/") + "/")):
                    matches.append((len(p["path"]), p["backend"]["service"]["name"]))
        if matches:
            return max(matches)[1]
    return None


def dns_layout():
    """What Route53 answers (terraform/modules/dns expanded for the global root's domain and
    regions), the health checks' path, and the certificate's names (terraform/modules/region)."""
    with open("terraform/global/main.tf") as f:
        dns_module = next(m["dns"] for m in scalars(hcl2.load(f))["module"] if "dns" in m)
    domain = dns_module["domain"]
    with open("terraform/modules/dns/main.tf") as f:
        parsed = scalars(hcl2.load(f))
    resources = {}
    for entry in parsed.get("resource", []):
        for kind, named in entry.items():
            resources.setdefault(kind, {}).update(named)
    front = next(l["front_names"] for l in parsed.get("locals", []) if "front_names" in l)
    names = set()
    for body in resources["aws_route53_record"].values():
        name = body["name"].replace("${var.domain}", domain)
        for key, values in (("${each.key}", REGIONS if "region" in str(body.get("for_each")) else front), ("${each.value.name}", front)):
            if key in name:
                names.update(name.replace(key, v) for v in values)
                break
        else:
            names.add(name)
    check_path = resources["aws_route53_health_check"]["region"]["resource_path"]
    with open("terraform/modules/region/main.tf") as f:
        region_parsed = scalars(hcl2.load(f))
    variables = {k: v for entry in region_parsed.get("variable", []) for k, v in entry.items()}
    cert = next(named["public"] for entry in region_parsed.get("resource", []) for kind, named in entry.items() if kind == "aws_acm_certificate")
    cert_domain = variables["domain"]["default"]
    cert_names = [n.replace("${var.domain}", cert_domain) for n in [cert["domain_name"], *cert["subject_alternative_names"]]]
    return domain, names, check_path, cert_names


def routing_problems(docs, layout):
    """What would keep a voter's request from reaching ingest, or Route53 from seeing a region
    healthy: [] when nothing."""
    domain, names, check_path, cert_names = layout
    ingress = find(docs, "Ingress", "tally")
    if ingress is None:
        return ["no Ingress"]
    problems = []
    for name in sorted(names):
        want = "tally-reader" if name.startswith("results.") or ".results." in name else "tally-ingest"
        got = routed_service(ingress, name, "/v1/polls/p/votes")
        if got != want:
            problems.append(f"{name} goes to {got}, not {want}")
    for rule in ingress["spec"].get("rules", []):
        for p in rule.get("http", {}).get("paths", []):
            backend = p["backend"]["service"]
            service = find(docs, "Service", backend["name"])
            if service is None or backend["port"].get("name") not in [q.get("name") for q in service["spec"].get("ports", [])]:
                problems.append(f"the Ingress sends {rule.get('host', 'any host')}{p['path']} to {backend['name']}:{backend['port']}, which no Service offers")
    # Route53's checker sends the load balancer's own name as the host.
    got = routed_service(ingress, "k8s-tally-0123456789.elb.amazonaws.com", check_path)
    if got != "tally-ingest":
        problems.append(f"the health check's {check_path} on the load balancer's name goes to {got}")
    for rule in ingress["spec"].get("rules", []):
        if "host" in rule and not any(host_matches(c, rule["host"]) or c == rule["host"] for c in cert_names):
            problems.append(f"the certificate ({cert_names}) does not cover {rule['host']}")
    annotations = ingress["metadata"].get("annotations", {})
    idle = re.search(r"idle_timeout\.timeout_seconds=(\d+)", annotations.get("alb.ingress.kubernetes.io/load-balancer-attributes", ""))
    idle = int(idle.group(1)) if idle else 60
    for role in ("ingest", "reader"):
        keep = (env_source(docs, role, "TALLY_KEEP_ALIVE_TIMEOUT_MS") or ("value", "10000"))[1]
        if int(keep) <= idle * 1000:
            problems.append(f"{role} closes idle connections after {keep} ms, before the load balancer's {idle} s: 502s")
    return problems


ROLE_DB_KEY = {"ingest": ("TALLY_POSTGRES_URL", "ingest-postgres-url"), "aggregator": ("TALLY_POSTGRES_URL", "aggregator-postgres-url"), "reader": ("TALLY_POSTGRES_SOURCES", "reader-postgres-sources")}
MIGRATE_ENV = {"TALLY_POSTGRES_URL": "owner-postgres-url", "TALLY_INGEST_DB_PASSWORD": "ingest-db-password", "TALLY_AGGREGATOR_DB_PASSWORD": "aggregator-db-password", "TALLY_READER_DB_PASSWORD": "reader-db-password"}


def secret_refs(workload):
    """{variable: (secret, key)} of a workload's first container."""
    containers = workload.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]) for e in containers[0].get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def database_login_problems(docs, secrets_tf):
    """What would let a role log in as the owner, or leave the schema unmigrated or a role
    without its password: [] when nothing. `secrets_tf` is modules/secrets/main.tf's text."""
    problems = []
    for role, (variable, key) in ROLE_DB_KEY.items():
        refs = secret_refs(find(docs, "Deployment", f"tally-{role}") or {})
        if refs.get(variable) != ("tally-credentials", key):
            problems.append(f"{role}'s {variable} comes from {refs.get(variable)}, not its own login ({key})")
        if any(secret == "tally-migrate" for secret, _ in refs.values()):
            problems.append(f"{role} reads the owner's secret")
        if not re.search(rf'"{key}"\s*=\s*local\.url\["{role}"\]', secrets_tf):
            problems.append(f"terraform writes {key} from another login than {role}'s")
    if 'role == "owner" ? var.logins["owner-user"] : "tally_${role}"' not in secrets_tf:
        problems.append("terraform's role URLs do not log in as tally_<role>")
    credentials = find(docs, "ExternalSecret", "tally-credentials") or {}
    if any(str(d.get("extract", {}).get("key", "")).endswith("/migrate") for d in credentials.get("spec", {}).get("dataFrom", [])):
        problems.append("the roles' secret holds the owner's credentials")
    job = find(docs, "Job", "tally-migrate")
    if job is None:
        problems.append("no migration Job")
    else:
        c = job["spec"]["template"]["spec"]["containers"][0]
        if c.get("args") != ["migrate"]:
            problems.append(f"the migration Job runs {c.get('args')}")
        refs = secret_refs(job)
        for variable, key in MIGRATE_ENV.items():
            if refs.get(variable) != ("tally-migrate", key):
                problems.append(f"the migration Job's {variable} is {refs.get(variable)}, not tally-migrate's {key}")
    return problems


def database_login_assertions(region, docs):
    with open("terraform/modules/secrets/main.tf") as f:
        secrets_tf = f.read()
    problems = database_login_problems(docs, secrets_tf)
    check(f"{region}: a Job migrates as the owner and sets each role's password; every role logs in as itself", not problems, "; ".join(problems))
    as_owner = json.loads(json.dumps(docs))
    for d in as_owner:
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "tally-ingest":
            for e in d["spec"]["template"]["spec"]["containers"][0]["env"]:
                if e["name"] == "TALLY_POSTGRES_URL":
                    e["valueFrom"]["secretKeyRef"] = {"name": "tally-migrate", "key": "owner-postgres-url"}
    no_job = [d for d in docs if d["kind"] != "Job"]
    check(f"{region}: self-test: a role logging in as the owner, and no migration Job, are each caught",
          bool(database_login_problems(as_owner, secrets_tf)) and bool(database_login_problems(no_job, secrets_tf)))


def routing_assertions(region, docs, layout):
    problems = routing_problems(docs, layout)
    check(f"{region}: every name Route53 answers reaches its role through the Ingress, the health check reaches ingest's /readyz, TLS covers every host, idle connections close at the load balancer first", not problems, "; ".join(problems))
    # The checks must be able to fail: the Ingress as it was (per-region hosts, no rule for the
    # health check, an hour's idle timeout) is caught on each count.
    old = json.loads(json.dumps(docs))
    ingress = find(old, "Ingress", "tally")
    ingress["spec"]["rules"] = [r for r in ingress["spec"]["rules"] if "host" in r]
    for r in ingress["spec"]["rules"]:
        r["host"] = r["host"].replace(".", f".{region}.", 1) if "*" not in r["host"] else r["host"]
    ingress["metadata"]["annotations"]["alb.ingress.kubernetes.io/load-balancer-attributes"] = "idle_timeout.timeout_seconds=3600"
    caught = routing_problems(old, layout) + routing_problems([d for d in docs if not (d["kind"] == "Service" and d["metadata"]["name"] == "tally-reader")], layout)
    check(f"{region}: self-test: unmatched hosts, a health check with no rule, an uncovered host, a longer idle timeout and a missing Service are each caught",
          any("goes to None" in p for p in caught) and any("health check" in p for p in caught) and any("certificate" in p for p in caught) and any("502" in p for p in caught) and any("no Service offers" in p for p in caught), "; ".join(caught))


def overlays_differ_only_by_region(rendered):
    """Replacing one region's name and its bounds with another's gives the same objects."""
    def normalise(region, docs):
        text = json.dumps(docs, sort_keys=True).replace(region, "REGION")
        out = json.loads(text)
        for d in out:
            if d["kind"] == "HorizontalPodAutoscaler":
                d["spec"]["minReplicas"] = d["spec"]["maxReplicas"] = "N"
            if d["kind"] == "ConfigMap" and "TALLY_TRUSTED_PROXIES" in d.get("data", {}):
                d["data"]["TALLY_TRUSTED_PROXIES"] = "REGION-SUBNETS"
        return out
    base = normalise(REGIONS[0], rendered[REGIONS[0]])
    for r in REGIONS[1:]:
        check(f"{r} differs from {REGIONS[0]} only in its region and HPA bounds", normalise(r, rendered[r]) == base)


def scalars(node):
    """The HCL parser checkov brings wraps every attribute's value in a one-element list; unwrap
    those (blocks stay lists of dicts) so the assertions read like the source."""
    if isinstance(node, dict):
        return {k: scalars(v) for k, v in node.items()}
    if isinstance(node, list):
        if len(node) == 1 and not isinstance(node[0], dict):
            return scalars(node[0])
        return [scalars(v) for v in node]
    return node


def terraform_checks():
    out = run(["terraform", "fmt", "-check", "-recursive", "-diff", "terraform"])
    check("terraform fmt -check", out.returncode == 0, out.stdout[-2000:])
    parsed = {}
    for path in sorted(glob.glob("terraform/**/*.tf", recursive=True)):
        with open(path) as f:
            try:
                parsed[path] = scalars(hcl2.load(f))
            except Exception as e:  # the parser raises several exception types
                check(f"{path} parses as HCL", False, str(e))
    check(f"{len(parsed)} terraform files parse as HCL", len(parsed) == len(glob.glob("terraform/**/*.tf", recursive=True)))

    def resources(path):
        out = {}
        for entry in parsed.get(path, {}).get("resource", []):
            for kind, named in entry.items():
                out.setdefault(kind, {}).update(named)
        return out

    def modules(path):
        return {name: body for m in parsed.get(path, {}).get("module", []) for name, body in m.items()}

    for region in REGIONS:
        root = f"terraform/regions/{region}/main.tf"
        region_module = modules(root).get("region", {})
        role = region_module.get("postgres_role")
        want = "primary" if region == "us-east-1" else "replica"
        check(f"terraform {region}: PostgreSQL is the {want}", role == want, f"postgres_role = {role}")
        if want == "replica":
            check(f"terraform {region}: its replica follows the primary's ARN", "primary_db_arn" in region_module and "terraform_remote_state.primary" in str(region_module["primary_db_arn"]))
        backend = parsed[root]["terraform"][0]["backend"][0]["s3"]
        check(f"terraform {region}: remote state in S3 with locking and encryption", backend.get("dynamodb_table") and backend.get("encrypt") is True)
    pg = resources("terraform/modules/postgres/main.tf")["aws_db_instance"]["this"]
    check("terraform postgres: encrypted, Multi-AZ, not public", pg["storage_encrypted"] is True and pg["multi_az"] is True and pg["publicly_accessible"] is False)
    params = resources("terraform/modules/postgres/main.tf")["aws_db_parameter_group"]["this"]["parameter"]
    check("terraform postgres: the parameter group requires SSL", any(p["name"] == "rds.force_ssl" and str(p["value"]) == "1" for p in params))
    redis = resources("terraform/modules/redis/main.tf")["aws_elasticache_replication_group"]["shard"]
    check("terraform redis: TLS required, encryption at rest, RBAC users", redis["transit_encryption_enabled"] is True and redis.get("transit_encryption_mode") == "required" and redis["at_rest_encryption_enabled"] is True and "user_group_ids" in redis)
    waf = resources("terraform/modules/waf/main.tf").get("aws_wafv2_web_acl", {}).get("this", {})
    rules = waf.get("rule", [])
    rules = rules if isinstance(rules, list) else [rules]
    rate = [r for r in rules if "rate_based_statement" in json.dumps(r.get("statement", {}))]
    check("terraform waf: a rate rule per client address", any('"aggregate_key_type": "IP"' in json.dumps(r) and "block" in json.dumps(r.get("action", {})) for r in rate))
    with open("terraform/modules/waf/main.tf") as f:
        waf_text = f.read()
    check("terraform waf: AWS's common and known-bad-inputs rule groups", all(g in waf_text for g in ("AWSManagedRulesCommonRuleSet", "AWSManagedRulesKnownBadInputsRuleSet")))
    check("terraform waf: every region has one", "waf" in modules("terraform/modules/region/main.tf"))
    dns = resources("terraform/modules/dns/main.tf")
    records = dns["aws_route53_record"]
    check("terraform dns: every record has a health check", all("health_check_id" in body for body in records.values()), [n for n, b in records.items() if "health_check_id" not in b])
    check("terraform dns: failover PRIMARY and SECONDARY per region, geolocation per continent, a default", records["primary"]["failover_routing_policy"][0]["type"] == "PRIMARY" and records["secondary"]["failover_routing_policy"][0]["type"] == "SECONDARY" and "geolocation_routing_policy" in records["continent"] and records["default"]["geolocation_routing_policy"][0]["country"] == "*")
    check("terraform dns: one health check per region", dns["aws_route53_health_check"]["region"]["for_each"] == "${var.regions}")
    regions = modules("terraform/global/main.tf")["dns"]["regions"][0]  # a map attribute parses as a one-map list
    continents = [c for r in regions.values() for c in r["continents"]]
    check("terraform global: every region serves a continent, none twice, all six inhabited ones", sorted(continents) == sorted(["NA", "SA", "EU", "AF", "AS", "OC"]) and all(r["continents"] for r in regions.values()))
    check("terraform global: failover targets are other regions", all(r["failover_to"] in regions and r["failover_to"] != name for name, r in regions.items()))


def checkov():
    for framework, target in [("kubernetes", ["-d", "k8s"]), ("terraform", ["-d", "terraform"]), ("dockerfile", ["-f", "Dockerfile"])]:
        out = run(["checkov", "--skip-download", "--compact", "-o", "json", "--framework", framework, *target])
        try:
            report = json.loads(out.stdout)
        except json.JSONDecodeError:
            check(f"checkov {framework} ran", False, out.stderr[-2000:])
            continue
        report = report[0] if isinstance(report, list) else report
        results = report.get("results", {})
        failed = results.get("failed_checks", [])
        skipped = results.get("skipped_checks", [])
        passed = report.get("summary", {}).get("passed", 0)
        unexplained = [s["check_id"] for s in skipped if not (s.get("check_result", {}).get("suppress_comment") or "").strip()]
        check(f"checkov {framework}: {passed} passed, {len(failed)} failed", passed > 0 and not failed, ", ".join(f"{f['check_id']} {f['resource']}" for f in failed))
        check(f"checkov {framework}: {len(skipped)} skips, each with its reason", not unexplained, ", ".join(unexplained))


def promtool(tmp):
    with open("k8s/base/observe/prometheus-rule.yaml") as f:
        rule = yaml.safe_load(f)
    rules = os.path.join(tmp, "rules.yml")
    with open(rules, "w") as f:
        yaml.safe_dump(rule["spec"], f, sort_keys=False)
    shutil.copy("k8s/base/observe/rules-test.yml", tmp)
    out = run(["promtool", "check", "rules", rules])
    check("promtool check rules", out.returncode == 0, (out.stdout + out.stderr).strip())
    out = run(["promtool", "test", "rules", os.path.join(tmp, "rules-test.yml")])
    check("promtool test rules", out.returncode == 0, (out.stdout + out.stderr).strip()[-3000:])
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    with open("k8s/base/observe/rules-test.yml") as f:
        tested = {t["alertname"] for test in yaml.safe_load(f)["tests"] for t in test.get("alert_rule_test", [])}
    check(f"every alert has a promtool test ({len(alerts)} alerts)", alerts <= tested, ", ".join(sorted(alerts - tested)))


def dashboards():
    for path in sorted(glob.glob("k8s/base/observe/dashboards/*.json")):
        with open(path) as f:
            d = json.load(f)
        exprs = [t.get("expr", "") for p in d["panels"] for t in p.get("targets", [])]
        check(f"{os.path.basename(path)}: {len(d['panels'])} panels, each with a query", d["panels"] and all(exprs) and all(p.get("targets") for p in d["panels"]))


# Crates the plane's image must never link: the lab, its fixtures and servers, and the AWS SDK.
LAB_CRATES = {"lab", "harness", "bench", "servers", "wan"}


def lab_crates_in(tree):
    """The lab and AWS SDK crates among `cargo tree --prefix none` output lines."""
    names = {line.split(" ")[0] for line in tree.splitlines() if line.strip()}
    return sorted(n for n in names if n in LAB_CRATES or n.startswith("aws-"))


def image_build_args(dockerfile="Dockerfile"):
    """The `cargo build` arguments of the Dockerfile's build step, without the profile flags."""
    with open(dockerfile) as f:
        for line in f:
            if line.startswith("RUN cargo build"):
                args = line.split("&&")[0].split()[3:]
                return [a for a in args if a not in ("--release", "--locked")]
    return None


def image_checks():
    args = image_build_args()
    check("the Dockerfile builds tally with cargo", args is not None and "tally" in args)
    if args is None:
        return
    out = run(["cargo", "tree", "-e", "normal", "--prefix", "none", *args])
    check("cargo tree of the image's build", out.returncode == 0, out.stderr.strip()[-2000:])
    found = lab_crates_in(out.stdout)
    check(f"the image ({' '.join(args)}) links no lab crate and no AWS SDK", not found, ", ".join(found))
    # The check must be able to fail: the same build with the lab turned on is caught.
    with_lab = run(["cargo", "tree", "-e", "normal", "--prefix", "none", *args, "--features", "lab,route53"])
    caught = lab_crates_in(with_lab.stdout)
    check("self-test: the same build with the lab and Route53 is caught", {"lab", "harness", "servers"} <= set(caught) and any(c.startswith("aws-") for c in caught), ", ".join(caught))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tally", required=True)
    args = parser.parse_args()
    plan = json.loads(run([args.tally, "capacity", "--json"]).stdout)
    layout = dns_layout()
    with tempfile.TemporaryDirectory() as tmp:
        rendered = {}
        for region in REGIONS:
            rendered[region] = render(region)
            if rendered[region]:
                validate(region, rendered[region], tmp)
                overlay_assertions(region, rendered[region], plan)
                identity_assertions(region, rendered[region])
                queue_assertions(region, rendered[region])
                routing_assertions(region, rendered[region], layout)
                database_login_assertions(region, rendered[region])
        if all(rendered.values()):
            overlays_differ_only_by_region(rendered)
        image_checks()
        terraform_checks()
        checkov()
        promtool(tmp)
        dashboards()
    if failures:
        print(f"\n{len(failures)} deployment checks failed: " + "; ".join(failures))
        sys.exit(1)
    print("\nall deployment checks passed")


if __name__ == "__main__":
    main()
