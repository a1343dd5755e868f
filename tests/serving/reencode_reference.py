"""The reference the vLLM tests compare against: behaviour log-probs recomputed by re-encoding."""
import numpy as np
import torch


def reencode_logprobs(model, batch, tokens: np.ndarray, samples_per_prefix: int, k: int,
                      temperature: float) -> np.ndarray:
    """log_softmax(logits / T) of each sampled token ``tokens [rows, k]`` (rows ordered
    ``(doc * n + cut) * G + sample``), from one full forward of ``prefix + continuation`` of
    ``model`` (our refine_ray model, float32 CPU). Returns ``[rows, k]`` float32."""
    G, out, row = samples_per_prefix, np.zeros(tokens.shape, np.float32), 0
    with torch.no_grad():
        for d in range(len(batch.docs)):
            for c in batch.cuts[d].tolist():
                prefix = torch.from_numpy(batch.docs.doc(d)[:c].astype(np.int64))
                resp = torch.from_numpy(tokens[row:row + G])
                logits = model.forward_segment(torch.cat([prefix.expand(G, -1), resp], 1)).logits
                logits = logits[:, c - 1:c + k - 1].float() / temperature
                out[row:row + G] = torch.log_softmax(logits, -1).gather(-1, resp[..., None])[..., 0].numpy()
                row += G
    return out
