import type { FloatArray } from "./safetensors.js";

/**
 * Add each delta to the matching parameter array in place (`param += delta`), which is how
 * a client keeps its copy of the parameters in step with the server's optimizer.
 */
export function applyDeltas(
  params: Record<string, FloatArray>,
  deltas: Record<string, FloatArray> | null,
): void {
  if (deltas === null) return;
  for (const [name, delta] of Object.entries(deltas)) {
    const param = params[name];
    if (param === undefined) throw new TypeError(`no parameter named "${name}" to apply a delta to`);
    if (param.length !== delta.length) {
      throw new RangeError(`"${name}": ${delta.length} deltas for ${param.length} values`);
    }
    for (let i = 0; i < param.length; i++) param[i] = (param[i] as number) + (delta[i] as number);
  }
}
