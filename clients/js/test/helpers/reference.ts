/**
 * Plain float64 re-implementations of torch.optim.Adam and torch.optim.SGD (torch 2.x
 * update rules, single tensor, no foreach), used to check the server's deltas.
 */

export class ReferenceAdam {
  private readonly m: Float64Array;
  private readonly v: Float64Array;
  private t = 0;

  constructor(
    size: number,
    /** Mutable, as a param group's lr is (an edit or a schedule changes it). */
    public lr: number,
    private readonly beta1 = 0.9,
    private readonly beta2 = 0.999,
    private readonly eps = 1e-8,
  ) {
    this.m = new Float64Array(size);
    this.v = new Float64Array(size);
  }

  /** The delta (new - old) this step makes. */
  step(grad: ArrayLike<number>): Float64Array {
    this.t += 1;
    const delta = new Float64Array(grad.length);
    const bias1 = 1 - this.beta1 ** this.t;
    const bias2Sqrt = Math.sqrt(1 - this.beta2 ** this.t);
    const stepSize = this.lr / bias1;
    for (let i = 0; i < grad.length; i++) {
      const g = grad[i] as number;
      const m = (this.m[i] = this.beta1 * (this.m[i] as number) + (1 - this.beta1) * g);
      const v = (this.v[i] = this.beta2 * (this.v[i] as number) + (1 - this.beta2) * g * g);
      delta[i] = (-stepSize * m) / (Math.sqrt(v) / bias2Sqrt + this.eps);
    }
    return delta;
  }
}

export class ReferenceSGD {
  private buffer: Float64Array | null = null;

  constructor(
    /** Mutable, as a param group's values are. */
    public lr: number,
    public momentum = 0,
    private readonly weightDecay = 0,
    private readonly dampening = 0,
    private readonly nesterov = false,
  ) {}

  step(grad: ArrayLike<number>, param: ArrayLike<number>): Float64Array {
    const d = Float64Array.from(grad, (g, i) => g + this.weightDecay * (param[i] as number));
    if (this.momentum !== 0) {
      if (this.buffer === null) {
        this.buffer = Float64Array.from(d);
      } else {
        for (let i = 0; i < d.length; i++) {
          this.buffer[i] = this.momentum * (this.buffer[i] as number) + (1 - this.dampening) * (d[i] as number);
        }
      }
      for (let i = 0; i < d.length; i++) {
        d[i] = this.nesterov ? (d[i] as number) + this.momentum * (this.buffer[i] as number) : (this.buffer[i] as number);
      }
    }
    return d.map((value) => -this.lr * value);
  }
}

/** Deterministic gradients: a smooth function of step and position, varied in sign. */
export function gradient(size: number, step: number, seed: number): Float64Array {
  return Float64Array.from({ length: size }, (_, i) => Math.sin(seed * 12.9898 + i * 78.233 + step * 3.1) * (1 + (i % 3)));
}

export function maxAbsDifference(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Number.POSITIVE_INFINITY;
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs((a[i] as number) - (b[i] as number)));
  return worst;
}
