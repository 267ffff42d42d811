from ..cost import Cost


def longformer_cost(p, env, s):
    return Cost()
