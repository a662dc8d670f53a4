// Validates custom resources against the schemas the @kubernetes-models packages publish (generated from
// the Gateway API and prometheus-operator types). Reads a JSON list of objects on stdin, prints one JSON
// list of {kind, name, error} (error null when valid) and exits 1 when any object is invalid or has no
// schema here. Install with `make k8s-crd-schemas`; tests/test_k8s.py runs it.
import { readFileSync } from "node:fs";

const PACKAGES = {
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

const objects = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const obj of objects) {
  const [group, version] = obj.apiVersion.split("/");
  const result = { kind: obj.kind, name: obj.metadata?.name ?? null, error: null };
  const pkg = PACKAGES[group];
  if (!pkg) {
    result.error = `no schema for ${obj.apiVersion} here`;
  } else {
    try {
      const module = await import(`${pkg}/${group}/${version}/${obj.kind}`);
      new module[obj.kind](obj).validate();
    } catch (err) {
      result.error = err.code === "ERR_PACKAGE_PATH_NOT_EXPORTED" || err.code === "ERR_MODULE_NOT_FOUND"
        ? `no schema for ${obj.apiVersion} ${obj.kind} in ${pkg}`
        : err.message;
    }
  }
  results.push(result);
}
console.log(JSON.stringify(results));
process.exit(results.some((r) => r.error !== null) ? 1 : 0);
