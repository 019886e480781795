//! Helpers shared by the store tests.
#![allow(dead_code)]

pub mod postgres;
