//! An op of one's own ([`Op`], recorded with [`Tape::record`]) whose backward gives a gradient
//! of the wrong shape for its input: the backward is an error naming the op, wherever that
//! gradient goes (to a leaf, into a built-in op's backward, or added in place). Before, the
//! first gradient to reach a node was kept as it came: a leaf reported a `[100, 100]` gradient
//! for a `[4, 8]` value, and GELU's backward multiplied the overlapping prefix.

use nibble_autograd::{AutogradError, Op, Result, Tape, Var};
use nibble_tensor::Tensor;

/// Gives a gradient of `shape` (ones) for its one input, returned or (with `in_place`) put in
/// the slot of the gradient accumulated so far.
struct WrongShape {
    shape: Vec<usize>,
    in_place: bool,
}

impl Op for WrongShape {
    fn name(&self) -> &'static str {
        "wrong_shape"
    }
    fn backward(self: Box<Self>, _d_out: Tensor) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(Tensor::full(&self.shape, 1.0))])
    }
    fn backward_accumulate(
        self: Box<Self>,
        d_out: Tensor,
        acc: &mut [Option<Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        if self.in_place && acc[0].is_some() {
            acc[0] = Some(Tensor::full(&self.shape, 1.0));
            return Ok(vec![None]);
        }
        self.backward(d_out)
    }
}

/// What runs between the leaf and the op of one's own.
type Before = fn(&Tape, &Var) -> Result<Var>;

fn backward_through(before: Before, shape: &[usize], in_place: bool) -> Result<()> {
    let tape = Tape::new();
    let x = tape.leaf(Tensor::full(&[4, 8], 0.5));
    let y = before(&tape, &x)?;
    let z = tape.record("wrong_shape", &[&y], y.value().clone(), false, || {
        Box::new(WrongShape {
            shape: shape.to_vec(),
            in_place,
        })
    })?;
    // With `in_place`, a second use of y gives it a gradient first, which the op then swaps.
    let loss = if in_place {
        let both = tape.add(&z, &y)?;
        tape.sum(&both)?
    } else {
        tape.sum(&z)?
    };
    tape.backward(&loss).map(|_| ())
}

#[test]
fn a_gradient_of_the_wrong_shape_is_an_error() {
    let ops: [(&str, Before); 3] = [
        ("leaf", |_, x| Ok(x.clone())),
        ("gelu", |t, x| t.gelu(x)),
        ("add", |t, x| t.add(x, x)),
    ];
    for (name, before) in ops {
        for shape in [&[100usize, 100][..], &[2, 2], &[32], &[8, 4]] {
            for in_place in [false, true] {
                let err = backward_through(before, shape, in_place).unwrap_err();
                assert!(
                    matches!(
                        err,
                        AutogradError::BadGradient {
                            op: "wrong_shape",
                            ..
                        }
                    ),
                    "{name} {shape:?} in place {in_place}: {err}"
                );
            }
        }
        // The right shape goes through.
        backward_through(before, &[4, 8], false).unwrap();
        backward_through(before, &[4, 8], true).unwrap();
    }
}
