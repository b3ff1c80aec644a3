//! The one place errors become gRPC statuses.
//!
//! | error                         | code                |
//! |-------------------------------|---------------------|
//! | [`InvalidArgument`]           | INVALID_ARGUMENT    |
//! | `LockError::NotOwner`         | FAILED_PRECONDITION |
//! | `LockError::Store(Unavailable)`, `ShuttingDown` | UNAVAILABLE |
//! | `LockError::Store(Unexpected)`| INTERNAL            |
//! | `LockError::Cancelled`        | CANCELLED           |
//! | `LockError::Exhausted`        | RESOURCE_EXHAUSTED  |
//! | `StockError::UnknownProduct`, `UnknownOrder` | NOT_FOUND |
//! | `StockError::Insufficient`, `Overflow` | FAILED_PRECONDITION |
//! | `StockError::OrderIdReused`   | ALREADY_EXISTS      |
//! | `StockError::LockTimeout`, `LeaseLost`, `DbError::Conflict` | ABORTED |
//! | `DbError::Unavailable`, lock errors as above | UNAVAILABLE |
//! | `DbError::Other`              | INTERNAL            |

use tonic::Status;

use crate::{
    lock::{Invalid, LockError, StoreError},
    stock::{DbError, StockError},
};

/// A request field that failed validation. The message reads "`field`: problem (limit)".
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidArgument {
    pub field: String,
    pub problem: Invalid,
}

impl InvalidArgument {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: Invalid(problem.into()),
        }
    }
}

/// Attaches the field name to a constructor's complaint.
pub trait FieldExt<T> {
    fn field(self, field: &str) -> Result<T, InvalidArgument>;
}

impl<T> FieldExt<T> for Result<T, Invalid> {
    fn field(self, field: &str) -> Result<T, InvalidArgument> {
        self.map_err(|problem| InvalidArgument {
            field: field.to_owned(),
            problem,
        })
    }
}

impl From<InvalidArgument> for Status {
    fn from(error: InvalidArgument) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

impl From<LockError> for Status {
    fn from(error: LockError) -> Self {
        match &error {
            LockError::NotOwner(_) => Status::failed_precondition(error.to_string()),
            LockError::Store(StoreError::Unavailable(_)) | LockError::ShuttingDown => {
                Status::unavailable(error.to_string())
            }
            LockError::Store(StoreError::Unexpected(_)) => Status::internal(error.to_string()),
            LockError::Cancelled => Status::cancelled(error.to_string()),
            LockError::Exhausted(_) => Status::resource_exhausted(error.to_string()),
        }
    }
}

impl From<StockError> for Status {
    fn from(error: StockError) -> Self {
        let message = error.to_string();
        match error {
            StockError::UnknownProduct(_) | StockError::UnknownOrder(_) => {
                Status::not_found(message)
            }
            StockError::Insufficient(_) | StockError::Overflow { .. } => {
                Status::failed_precondition(message)
            }
            StockError::OrderIdReused(_) => Status::already_exists(message),
            StockError::LockTimeout(_)
            | StockError::LeaseLost(_)
            | StockError::Db(DbError::Conflict(_)) => Status::aborted(message),
            StockError::Db(DbError::Unavailable(_)) => Status::unavailable(message),
            StockError::Db(DbError::Duplicate(_) | DbError::Other(_)) => Status::internal(message),
            StockError::Lock(lock) => lock.into(),
        }
    }
}
