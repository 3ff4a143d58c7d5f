//go:build tools

// Package tools pins etcd's server command (the main package at the module root) for go.sum.
package tools

import _ "go.etcd.io/etcd/server/v3"
