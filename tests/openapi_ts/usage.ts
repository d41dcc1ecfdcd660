// tests/test_openapi_tools.py copies this next to api.ts, which openapi-typescript made from the live
// /openapi.json, and type-checks both with tsc --strict: a client's first lines, as a user writes them.
import type { components, operations } from "./api";

type JobRequest = operations["create_job"]["requestBody"]["content"]["application/json"];
type Created = operations["create_job"]["responses"][202]["content"]["application/json"];
type Status = operations["get_job"]["responses"][200]["content"]["application/json"];

export const minimal: JobRequest = { prompts: ["a lighthouse at dusk, oil painting"] };
export const full: JobRequest = { prompts: ["a"], num_images_per_prompt: 2, format: "webp", quality: 85, seed: 7, return_format: "url" };
// @ts-expect-error prompts is the one field a request must have
export const missing: JobRequest = { seed: 7 };
export const follow = (created: Created): string => created.location ?? `/jobs/${created.job_id}`;
export const finished = (status: Status): boolean => status.state === "done" && (status.images ?? []).length === status.images_total;
export const archiveState: operations["get_job_archive"]["responses"][200]["headers"]["X-Job-State"] = "running";
export const firstLine: components["schemas"]["ProgressLine"] = { type: "job", job_id: "0f", images_total: 1, return_format: "base64", seeds: [7] };
