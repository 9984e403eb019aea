import torch

from if_query.gradients import Whitener


def test_whitener_rotation_orders_agree_with_rotating_the_gradient():
    torch.manual_seed(0)
    out_features, in_features = 6, 4
    q_g = torch.linalg.qr(torch.randn(out_features, out_features))[0]
    q_a = torch.linalg.qr(torch.randn(in_features, in_features))[0]
    lam = torch.rand(out_features, in_features) + 0.1
    factors = {"activation_eigenvectors": {"m": q_a}, "gradient_eigenvectors": {"m": q_g},
               "lambda_matrix": {"m": lam * 3}, "num_lambda_processed": {"m": torch.tensor(3.0)}}
    whitener = Whitener("ekfac", factors, "m", damping=0.5, device=torch.device("cpu"))
    for tokens in (1, 200):  # short sequences rotate token vectors, long ones the summed gradient
        inputs, grads = torch.randn(2, tokens, in_features), torch.randn(2, tokens, out_features)
        gradient = torch.einsum("bto,bti->boi", grads, inputs)
        expected = (q_g.T @ gradient @ q_a) / torch.sqrt(lam + 0.5)
        torch.testing.assert_close(whitener(inputs, grads), expected.flatten(1), rtol=1e-5, atol=1e-5)
